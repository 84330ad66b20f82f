"""The embedded demo: synthetic long streams whose right answers are known exactly."""
