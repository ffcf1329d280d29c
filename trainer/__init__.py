"""spineseg trainer package."""
