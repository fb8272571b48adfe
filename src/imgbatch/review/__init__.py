"""What people read: the report, progress, console, step summary, provenance, contact sheet."""
