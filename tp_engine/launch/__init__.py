"""Running ranks on several hosts: the network interface that reaches the
rendezvous (:mod:`.interface`) and simulated hosts for tests and benchmarks
(:mod:`.simhosts`, :mod:`.latency`), the layout the links favour
(:mod:`.placement`), and the CPUs each rank of a host is pinned to
(:mod:`.topology`)."""
