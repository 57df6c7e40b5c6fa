"""Speed measurements, reported as ratios taken side by side in one process (never asserted in tests)."""
