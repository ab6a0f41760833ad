"""The circuits dashboard: page, report sections, views and figures of ioi, colored-objects and
circuit-reuse runs."""
