"""rsseg."""
