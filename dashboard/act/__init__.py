"""The ACT dashboard: page, report sections and views of an attention-calibration run."""
