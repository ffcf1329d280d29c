"""spineseg data_prep package."""
