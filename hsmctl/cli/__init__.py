"""The command line: parses, calls the library, prints. The only place that imports
click or rich, and the only place that decides the process exit code."""
