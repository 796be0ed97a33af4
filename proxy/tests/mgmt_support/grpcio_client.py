"""A management API client as an operator would write it: Python grpcio with a default
channel (no options), no generated code; message types come from server reflection.

  grpcio_client.py script SOCKET UPSTREAM   health check, list services, create a pool and
                                            a route, each result on its own line
  grpcio_client.py probe TARGET AUTHORITY [TOKEN]
                                            one health check with :authority set to
                                            AUTHORITY; prints OK <status> or ERR <code>
"""
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

TIMEOUT = 20


def reflect(channel, request):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    return replies[0]


def file_descriptors(reply):
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


def method_of(channel, service, method):
    """The input and output message classes of service.method, built from reflection: the
    file defining the service, then every file it imports, asked for by name."""
    files = {}
    pending = file_descriptors(
        reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
    )
    while pending:
        f = pending.pop()
        if f.name in files:
            continue
        files[f.name] = f
        for dep in f.dependency:
            if dep not in files:
                pending.extend(
                    file_descriptors(
                        reflect(channel, reflection_pb2.ServerReflectionRequest(file_by_filename=dep))
                    )
                )
    pool = descriptor_pool.DescriptorPool()
    added = set()
    while len(added) < len(files):
        ready = [
            f for name, f in sorted(files.items())
            if name not in added and all(d in added for d in f.dependency)
        ]
        if not ready:
            raise SystemExit("imports that never resolve: %s" % sorted(set(files) - added))
        for f in ready:
            pool.Add(f)
            added.add(f.name)
    desc = pool.FindMethodByName("%s.%s" % (service, method))
    return (
        message_factory.GetMessageClass(desc.input_type),
        message_factory.GetMessageClass(desc.output_type),
    )


def call(channel, service, method, request_dict):
    request_class, response_class = method_of(channel, service, method)
    stub = channel.unary_unary(
        "/%s/%s" % (service, method),
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    reply = stub(json_format.ParseDict(request_dict, request_class()), timeout=TIMEOUT)
    return json_format.MessageToJson(reply, indent=None)


def script(socket, upstream):
    channel = grpc.insecure_channel("unix:" + socket)
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
    )
    print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
    listed = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    print("services", ",".join(sorted(s.name for s in listed.list_services_response.service)))
    pool = {"pool": {"name": "py", "upstreams": [{"address": upstream}]}}
    print("pool", call(channel, "proxy.v1.PoolService", "CreatePool", pool))
    route = {
        "route": {
            "name": "via-python",
            "listener": "web",
            "host": "python.example",
            "path_prefix": "/",
            "pool": "py",
        }
    }
    print("route", call(channel, "proxy.v1.RouteService", "CreateRoute", route))


def probe(target, authority, token):
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    metadata = [("authorization", "Bearer " + token)] if token else None
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT, metadata=metadata
        )
        print("OK", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
    except grpc.RpcError as e:
        print("ERR", e.code().name, e.details())


if __name__ == "__main__":
    if sys.argv[1] == "script":
        script(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "probe":
        probe(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    else:
        raise SystemExit(__doc__)
