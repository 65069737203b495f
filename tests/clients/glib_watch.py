#!/usr/bin/python3
"""A GLib client of VM Manager, built the way GNOME applets are.

Usage: glib_watch.py BUS_ADDRESS

Connects to the bus at BUS_ADDRESS, follows org.example.VmManager with a
Gio.DBusObjectManagerClient (device and job objects) and a Gio.DBusProxy
(the manager object), and prints one JSON document per line on stdout:

  {"event": "ready", "objects": {PATH: {IFACE: {PROP: VALUE}}},
   "manager": {PROP: VALUE}, "getall": {PATH: {IFACE: [PROP, ...]}},
   "name-owner": ":1.5"}
  {"event": "object-added", "path": P, "interfaces": {IFACE: {PROP: VALUE}},
   "getall": {IFACE: [PROP, ...]}}
  {"event": "object-removed", "path": P, "interfaces": [IFACE, ...]}
  {"event": "properties-changed", "path": P, "interface": I,
   "changed": {...}, "invalidated": [...], "cached": {...}}
  {"event": "signal", "path": P, "interface": I, "name": N, "args": [...]}
  {"event": "name-owner", "owner": ":1.7" or null}

Property values are what the proxies hold in their caches
(get_cached_property), i.e. what an applet binding to them would show;
"cached" repeats the changed keys as read back from the cache after the
change. "getall" lists the property names an explicit
org.freedesktop.DBus.Properties.GetAll returns. Exits when stdin closes.
"""

import json
import sys

from gi.repository import Gio, GLib

NAME = "org.example.VmManager"
ROOT = "/org/example/VmManager"
MANAGER_IFACE = "org.example.VmManager1"
STANDARD = ("org.freedesktop.DBus.",)


def emit(doc):
    print(json.dumps(doc, sort_keys=True), flush=True)


def cached(proxy):
    return {
        name: proxy.get_cached_property(name).unpack()
        for name in proxy.get_cached_property_names()
    }


def ours(interface_name):
    return not interface_name.startswith(STANDARD)


def interfaces_of(obj):
    return {
        p.get_interface_name(): cached(p)
        for p in obj.get_interfaces()
        if ours(p.get_interface_name())
    }


def get_all(connection, path, interface_name):
    reply = connection.call_sync(
        NAME,
        path,
        "org.freedesktop.DBus.Properties",
        "GetAll",
        GLib.Variant("(s)", (interface_name,)),
        GLib.VariantType("(a{sv})"),
        Gio.DBusCallFlags.NONE,
        10000,
        None,
    )
    return sorted(reply.unpack()[0].keys())


def get_all_of(connection, obj):
    result = {}
    for proxy in obj.get_interfaces():
        name = proxy.get_interface_name()
        if not ours(name):
            continue
        try:
            result[name] = get_all(connection, obj.get_object_path(), name)
        except GLib.Error as e:
            # A job may be gone before we ask; say so instead of failing.
            result[name] = {"error": e.message}
    return result


def main():
    address = sys.argv[1]
    connection = Gio.DBusConnection.new_for_address_sync(
        address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None,
        None,
    )
    manager_objects = Gio.DBusObjectManagerClient.new_sync(
        connection,
        Gio.DBusObjectManagerClientFlags.NONE,
        NAME,
        ROOT,
        None,
        None,
        None,
    )
    manager = Gio.DBusProxy.new_sync(
        connection,
        Gio.DBusProxyFlags.NONE,
        None,
        NAME,
        ROOT,
        MANAGER_IFACE,
        None,
    )

    def on_added(_om, obj):
        emit(
            {
                "event": "object-added",
                "path": obj.get_object_path(),
                "interfaces": interfaces_of(obj),
                "getall": get_all_of(connection, obj),
            }
        )

    def on_removed(_om, obj):
        emit(
            {
                "event": "object-removed",
                "path": obj.get_object_path(),
                "interfaces": sorted(interfaces_of(obj)),
            }
        )

    def on_props(_om, obj, proxy, changed, invalidated):
        changed = changed.unpack()
        emit(
            {
                "event": "properties-changed",
                "path": obj.get_object_path(),
                "interface": proxy.get_interface_name(),
                "changed": changed,
                "invalidated": list(invalidated),
                "cached": {
                    k: proxy.get_cached_property(k).unpack() for k in changed
                },
            }
        )

    def on_signal(_om, obj, proxy, _sender, name, params):
        emit(
            {
                "event": "signal",
                "path": obj.get_object_path(),
                "interface": proxy.get_interface_name(),
                "name": name,
                "args": list(params.unpack()),
            }
        )

    def on_owner(om, _pspec):
        emit({"event": "name-owner", "owner": om.get_name_owner()})

    def on_manager_props(proxy, changed, invalidated):
        changed = changed.unpack()
        emit(
            {
                "event": "properties-changed",
                "path": ROOT,
                "interface": MANAGER_IFACE,
                "changed": changed,
                "invalidated": list(invalidated),
                "cached": {
                    k: proxy.get_cached_property(k).unpack() for k in changed
                },
            }
        )

    def on_manager_signal(_proxy, _sender, name, params):
        emit(
            {
                "event": "signal",
                "path": ROOT,
                "interface": MANAGER_IFACE,
                "name": name,
                "args": list(params.unpack()),
            }
        )

    manager_objects.connect("object-added", on_added)
    manager_objects.connect("object-removed", on_removed)
    manager_objects.connect("interface-proxy-properties-changed", on_props)
    manager_objects.connect("interface-proxy-signal", on_signal)
    manager_objects.connect("notify::name-owner", on_owner)
    manager.connect("g-properties-changed", on_manager_props)
    manager.connect("g-signal", on_manager_signal)

    objects = {o.get_object_path(): interfaces_of(o) for o in manager_objects.get_objects()}
    getall = {
        o.get_object_path(): get_all_of(connection, o)
        for o in manager_objects.get_objects()
    }
    getall[ROOT] = {MANAGER_IFACE: get_all(connection, ROOT, MANAGER_IFACE)}
    emit(
        {
            "event": "ready",
            "objects": objects,
            "manager": cached(manager),
            "getall": getall,
            "name-owner": manager_objects.get_name_owner(),
        }
    )

    loop = GLib.MainLoop()

    def on_stdin(_fd, _condition):
        loop.quit()
        return False

    GLib.io_add_watch(
        GLib.IOChannel.unix_new(sys.stdin.fileno()),
        GLib.PRIORITY_DEFAULT,
        GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR,
        on_stdin,
    )
    loop.run()


if __name__ == "__main__":
    main()
