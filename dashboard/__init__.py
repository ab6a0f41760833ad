"""dashboard: the Dash app and static reports over run directories."""
