"""The VHD dashboard: page, report sections, views and figures of a vhd or vhr run."""
