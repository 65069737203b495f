// VM Manager from GJS, the way a GNOME Shell extension would use it.
//
//   gjs -m gjs_applet.js            follow devices and checks (Ctrl-C stops)
//   gjs -m gjs_applet.js IMAGE      also check IMAGE, print the result, exit
//
// It talks to the system bus; VMMANAGER_BUS_ADDRESS=unix:path=... points it
// at another bus (tests/desktop_clients.rs runs it that way). In a Shell
// extension, use Gio.DBus.system and keep everything asynchronous, as here.

import Gio from 'gi://Gio';
import GLib from 'gi://GLib';
import System from 'system';

const BUS_NAME = 'org.example.VmManager';
const MANAGER_PATH = '/org/example/VmManager';
const DEVICE_IFACE = 'org.example.VmManager1.PciDevice';

// The part of dbus/org.example.VmManager1.xml this applet uses.
const ManagerProxy = Gio.DBusProxy.makeProxyWrapper(`
<node>
  <interface name="org.example.VmManager1">
    <method name="CheckDisk">
      <arg name="image" type="s" direction="in"/>
      <arg name="options" type="a{sv}" direction="in"/>
      <arg name="report" type="a{sv}" direction="out"/>
    </method>
    <signal name="DiskChecked">
      <arg name="image" type="s"/>
      <arg name="report" type="a{sv}"/>
    </signal>
    <property name="Version" type="s" access="read"/>
    <property name="Jobs" type="ao" access="read"/>
  </interface>
</node>`);

const address = GLib.getenv('VMMANAGER_BUS_ADDRESS');
const bus = address
    ? Gio.DBusConnection.new_for_address_sync(address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT |
        Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, null, null)
    : Gio.DBus.system;
const loop = new GLib.MainLoop(null, false);
const image = System.programArgs[0];

// One line per device, from the proxy's cached properties (no extra calls).
function showDevice(object) {
    const dev = object.get_interface(DEVICE_IFACE);
    if (!dev)  // e.g. a job object
        return;
    const prop = name => dev.get_cached_property(name).deepUnpack();
    const state = prop('PassthroughReady')
        ? 'ready for passthrough'
        : `not ready: ${prop('PassthroughBlockers').join('; ')}`;
    print(`device ${prop('Address')} driver=${prop('Driver') || '(none)'} ${state}`);
}

function onDiskChecked(_proxy, _sender, [path, report]) {
    const r = GLib.Variant.new('a{sv}', report).recursiveUnpack();
    if (r.error)
        print(`checked ${path}: ${r.error}: ${r['error-message']}`);
    else
        print(`checked ${path}: ${r.result} (${r.leaks} leaks, ${r.corruptions} corruptions)`);
    if (image)
        loop.quit();
}

new ManagerProxy(bus, BUS_NAME, MANAGER_PATH, (manager, error) => {
    if (error) {
        printerr(`VM Manager is not available: ${error.message}`);
        loop.quit();
        return;
    }
    // A check can take minutes: GDBus gives up on a call after 25 s by default.
    manager.set_default_timeout(GLib.MAXINT32);
    print(`VM Manager ${manager.Version}, ${manager.Jobs.length} checks running`);
    manager.connectSignal('DiskChecked', onDiskChecked);
    manager.connect('g-properties-changed', () =>
        print(`checks running: ${manager.Jobs.length}`));

    const objects = new Gio.DBusObjectManagerClient({
        connection: bus,
        name: BUS_NAME,
        object_path: MANAGER_PATH,
    });
    objects.init_async(GLib.PRIORITY_DEFAULT, null, (om, res) => {
        om.init_finish(res);
        om.get_objects().forEach(showDevice);
        om.connect('object-added', (_om, object) => showDevice(object));
        om.connect('object-removed', (_om, object) =>
            print(`removed ${object.get_object_path()}`));
        om.connect('interface-proxy-properties-changed', (_om, object, _iface, changed) => {
            if (changed.deepUnpack().Driver)
                showDevice(object);
        });
        if (!image)
            return;
        // Errors come back as GLib.Error; the D-Bus error name is in
        // Gio.DBusError.get_remote_error(e), the message is fit to show.
        manager.CheckDiskRemote(image, {}, (_result, e) => {
            if (e) {
                const name = Gio.DBusError.get_remote_error(e);
                Gio.DBusError.strip_remote_error(e);
                printerr(`check failed: ${name}: ${e.message}`);
                loop.quit();
            }
            // On success the DiskChecked signal prints the report.
        });
    });
});
loop.run();
