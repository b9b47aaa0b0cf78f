"""Drift monitoring: trait projections of a deployed assistant's responses over time, with alerts."""
