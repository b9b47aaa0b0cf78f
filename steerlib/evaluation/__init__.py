"""Evidence about a trait vector: does the last prompt token predict the trait (prompt shift), a judge-free
personality inventory, and one HTML report of an extraction run."""
