"""What every dashboard page, view and report section shares: the page base, the start page, report
sections, the generic heads section, figure helpers and reading a run or a result alike."""
