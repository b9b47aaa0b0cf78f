"""Flagging finetuning data by its projection on a trait vector: scoring, ranking and plots, Ray Data scale-out."""
