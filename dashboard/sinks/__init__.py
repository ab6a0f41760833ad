"""The sinks dashboard: page, report sections and views of an attention-sinks run."""
