"""The development wing: the local Replicate simulator, `trigger`, `make demo` and the
`make run` runner. Production code never imports it; only `cli/` and the tests do."""
