"""The `ifa-rank` command line: one entry point whose subcommands live in the packages
they drive (model_export, service, loadtest), imported only when run."""
