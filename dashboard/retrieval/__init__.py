"""The retrieval-heads dashboard: its page, its report sections and the figures both draw."""
