"""`kvctl`: the operator's command line for one node (status, tiers, lookup, ls, inspect, evict,
pin, unpin, drain, top). It talks to the node only through `kvstore.client.Client`.

Modules: `main` (flags, settings, dispatch, exit codes), `inputs` (keys, tokens, tokenizers,
namespace selection), `commands` (one function per command), `render` (tables and JSON),
`top` (the live view), `errors` (what kvctl itself refuses).
"""
