"""spineseg export package."""
