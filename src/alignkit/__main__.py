from alignkit.cli import entry

entry()
