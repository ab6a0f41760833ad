"""Views: per-analysis data -> tables and figures, shared by dashboard pages and reports."""
