"""Files: line-numbered readers of user data, the one resumable results store, and saving plots."""
