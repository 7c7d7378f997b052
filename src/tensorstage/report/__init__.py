"""Tables, plots, reports and timeline exports for the other packages' results."""
