"""The head-atlas page and report section: every role of every head of one model on a layer x head
map (a head with several roles shows each), a table of the heads to filter and sort, a card per head
(its numbers with their percentiles and source runs, its roles and whether held-out inputs confirmed
them, its attention pattern), the overlap and correlation of roles across analyses, and atlases of
several models side by side by relative depth."""
