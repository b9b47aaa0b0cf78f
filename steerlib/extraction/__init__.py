"""From contrastive prompts to trait vectors: generate, judge, filter, capture, difference of means; layer sweeps."""
