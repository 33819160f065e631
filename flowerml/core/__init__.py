"""What every stage shares: the typed errors, files and the stored documents' plumbing, the training recipe, progress reporting, Markdown tables, child processes and the optional extras."""
