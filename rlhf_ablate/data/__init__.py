"""Korean preference data: readers, canonical records, versions (cleaning), splits, stats."""
