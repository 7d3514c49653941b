"""Figures and tables from results folders. ``analysis.<workload>.make_figures(run_dir)`` -> PNG paths."""
