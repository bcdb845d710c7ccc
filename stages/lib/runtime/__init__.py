"""How a stage runs: its command line, processes, output folders, seeding."""
