"""Flash-VStream: memory-based real-time understanding of long video streams."""

__version__ = "1.0.0"
