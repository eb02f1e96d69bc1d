"""Request distribution over many api_servers (`lmserve serve proxy`, `lmserve serve launch`).

    config.py      ProxyConfig (frozen; no torch)
    nodes.py       Node + NodeRegistry: models, load, health; the node file
    strategies.py  routing strategies (random, min_expected_latency, min_observed_latency, prefix_aware),
                   session pins
    health.py      async health checks with timeouts
    forward.py     send, fail over before the first byte, relay streams chunk by chunk
    app.py         build_app(config): LMDeploy's proxy API + the routed OpenAI endpoints
    launch.py      run_proxy(config); launch N api_servers + a proxy

The proxy never imports torch or the engine: it only speaks HTTP to api_servers.
"""
