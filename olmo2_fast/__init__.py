"""olmo2_fast."""
