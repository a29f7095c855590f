"""conveyor's development stand-ins for one machine with no cluster nodes: the local executor, which plays
the KubeRay and KServe controllers (``python -m conveyor_devstack.executor``). A development tool, never
shipped in the images (docker/*.Dockerfile copy only operator/ and runtime/)."""
