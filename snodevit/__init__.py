"""snodevit."""
