"""Running the project's playbooks through ansible-runner (the way AWX runs them)."""
