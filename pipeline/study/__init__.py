"""The reproduction study of the paper's Table 1 and Figures 1-2 (python -m pipeline.reproduce): its rows
and runs (design), running them (execute), and the table and figures built from their metrics (table,
figures)."""
