"""What fxlra knows about each op kind: the registry's rows and the local rules they name."""
