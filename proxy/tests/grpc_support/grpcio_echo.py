"""Calls proxy.testing.Echo through proxyd with Python grpcio (no generated code: the
two small messages are encoded by hand). Prints one line per result.

usage: grpcio_echo.py HOST:PORT
"""
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def echo_request(message, count=0, fail_code=0):
    data = message.encode()
    out = b"\x0a" + varint(len(data)) + data
    if count:
        out += b"\x10" + varint(count)
    if fail_code:
        out += b"\x20" + varint(fail_code)
    return out


def echo_reply(data):
    fields, i = {}, 0
    while i < len(data):
        key = data[i]
        i += 1
        number, wire = key >> 3, key & 7
        value, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if wire == 2:
            fields.setdefault(number, []).append(data[i:i + value].decode())
            i += value
        else:
            fields.setdefault(number, []).append(value)
    return {
        "message": fields.get(1, [""])[0],
        "index": fields.get(2, [0])[0],
        "upstream": fields.get(3, [""])[0],
    }


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    unary = channel.unary_unary(
        "/proxy.testing.Echo/Unary",
        request_serializer=lambda r: r,
        response_deserializer=echo_reply,
    )
    reply = unary(echo_request("from python"), timeout=10)
    print("unary", reply["message"], reply["upstream"])
    stream = channel.unary_stream(
        "/proxy.testing.Echo/ServerStream",
        request_serializer=lambda r: r,
        response_deserializer=echo_reply,
    )
    indexes = [r["index"] for r in stream(echo_request("many", count=4), timeout=10)]
    print("stream", ",".join(str(i) for i in indexes))
    try:
        unary(echo_request("python says no", fail_code=9), timeout=10)
        print("error none")
    except grpc.RpcError as e:
        print("error", e.code().name, e.details())
    missing = channel.unary_unary(
        "/not.Routed/Call",
        request_serializer=lambda r: r,
        response_deserializer=lambda d: d,
    )
    try:
        missing(b"", timeout=10)
        print("noroute none")
    except grpc.RpcError as e:
        print("noroute", e.code().name, e.details())


main()
