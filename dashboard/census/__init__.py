"""The census dashboard: page, report sections and views of a head-census run."""
