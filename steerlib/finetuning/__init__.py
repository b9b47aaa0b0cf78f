"""Finetuning data and models: flagging samples by projection, measuring the finetuning shift, preventative steering."""
