"""Tables and plots of what a search did, from its run directories."""
