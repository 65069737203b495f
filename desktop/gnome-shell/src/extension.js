// VM Manager in the GNOME Shell top bar: the PCI devices and whether they
// can be passed through to a VM (Detach/Reattach through polkit), the disk
// checks of this session, and whether the service runs.
//
// One source, two builds (desktop/gnome-shell/build.py): as written here for
// GNOME 45+ (ES modules), and rewritten for GNOME 43-44 (`imports`). The
// build understands only these forms, so keep to them:
//   import X from 'gi://X';
//   import * as X from 'resource:///org/gnome/shell/ui/x.js';
//   import {Extension} from 'resource:///org/gnome/shell/extensions/extension.js';
//   export default class Name extends Extension {
//
// Everything talks to the system bus asynchronously; nothing polls. The
// service is followed through its ObjectManager (GDBusObjectManagerClient),
// which also notices it going away and coming back; it is never started
// behind the user's back (DO_NOT_AUTO_START), only by "Start the service".
// It stays enabled while the screen is locked (session mode unlock-dialog),
// hidden, so that the checks of the session survive a lock (see disable()).

import Gio from 'gi://Gio';
import GLib from 'gi://GLib';
import GObject from 'gi://GObject';
import Pango from 'gi://Pango';
import St from 'gi://St';

import * as Main from 'resource:///org/gnome/shell/ui/main.js';
import * as PanelMenu from 'resource:///org/gnome/shell/ui/panelMenu.js';
import * as PopupMenu from 'resource:///org/gnome/shell/ui/popupMenu.js';
import {Extension} from 'resource:///org/gnome/shell/extensions/extension.js';

const BUS_NAME = 'org.example.VmManager';
const MANAGER_PATH = '/org/example/VmManager';
const MANAGER_IFACE = 'org.example.VmManager1';
const DEVICE_IFACE = 'org.example.VmManager1.PciDevice';
const PROPERTIES_IFACE = 'org.freedesktop.DBus.Properties';

/** The key in Main.panel.statusArea. */
const ROLE = 'vmmanager';
/** Disk checks kept in the menu (the newest). */
const MAX_CHECKS = 8;
/** Detach and Reattach may wait for the user at polkit's password dialog. */
const INTERACTIVE_TIMEOUT_MS = 10 * 60 * 1000;
/** The service answers InUseBy within 30 s (it gives up scanning then). */
const IN_USE_TIMEOUT_MS = 35 * 1000;

const ICON = 'computer-symbolic';
const ATTENTION_ICON = 'dialog-warning-symbolic';

/** What the service computes when read and never signals, shown in a
 * device's submenu: read again each time the submenu opens. */
const READ_ON_OPEN = ['HostUsers', 'AutoReturn', 'PersistentDriver', 'PersistentOrigin'];

/** Who made a boot-time claim (PersistentOrigin), in words. */
const CLAIMED_BY = {
    vmmanager: ' (by VM Manager)',
    other: ' (by driverctl or an admin)',
};

/** PCI base classes, for devices without a name in the hwdb. */
const PCI_CLASSES = {
    0x01: 'Storage controller',
    0x02: 'Network controller',
    0x03: 'Display controller',
    0x04: 'Multimedia controller',
    0x06: 'Bridge',
    0x0c: 'Serial bus controller',
};

/** vfio-pci and its vendor variants, as the service counts them. */
function isVfioDriver(driver) {
    return driver === 'vfio-pci' || driver.endsWith('_vfio_pci') || driver.endsWith('-vfio-pci');
}

function isCancelled(error) {
    return error instanceof GLib.Error &&
        error.matches(Gio.IOErrorEnum, Gio.IOErrorEnum.CANCELLED);
}

/** A D-Bus error as the service means it to be shown: its message. */
function errorText(error) {
    if (error instanceof GLib.Error && Gio.DBusError.is_remote_error(error))
        Gio.DBusError.strip_remote_error(error);
    return error.message;
}

/** Lets a label wrap instead of widening the menu (menus wider than the
 * screen were seen with long blockers and paths); .vmmanager-text caps it. */
function wrap(label, ...styleClasses) {
    label.add_style_class_name('vmmanager-text');
    styleClasses.forEach(c => label.add_style_class_name(c));
    const text = label.clutter_text;
    text.line_wrap = true;
    text.line_wrap_mode = Pango.WrapMode.WORD_CHAR;
    text.ellipsize = Pango.EllipsizeMode.NONE;
    return label;
}

/** A line of information, not clickable. */
function infoItem(text, ...styleClasses) {
    const item = new PopupMenu.PopupMenuItem(text, {reactive: false, can_focus: false});
    wrap(item.label, ...styleClasses);
    return item;
}

function actionItem(text, callback) {
    const item = new PopupMenu.PopupMenuItem(text);
    wrap(item.label);
    item.connect('activate', callback);
    return item;
}

function plural(n, one, many) {
    return `${n} ${n === 1 ? one : many}`;
}

/** A DiskChecked report in words: {title, detail, problem}. */
function describeCheck(image, report) {
    const name = GLib.path_get_basename(image);
    const format = report.format ? ` (${report.format})` : '';
    const time = GLib.DateTime.new_now_local().format('%H:%M:%S');
    const detail = `${image}${format} · ${time}`;
    if (report.error) {
        const kind = report.error.replace(/^.*\./, '');
        const message = report['error-message'] ?? '';
        const what = kind === 'InUse' ? 'in use, not checked' : `check failed (${kind})`;
        return {title: `${name}: ${what}`, detail: `${message}\n${detail}`, problem: true};
    }
    const fixed = (report['leaks-fixed'] ?? 0) + (report['corruptions-fixed'] ?? 0);
    switch (report.result) {
    case 'clean':
        return {
            title: fixed > 0 ? `${name}: repaired, no errors now` : `${name}: no errors`,
            detail,
            problem: false,
        };
    case 'leaks':
        return {
            title: `${name}: ${plural(report.leaks, 'leaked cluster', 'leaked clusters')}`,
            detail,
            problem: false,
        };
    case 'corrupt':
        return {
            title: `${name}: corrupt, ${plural(report.corruptions, 'corruption', 'corruptions')}`,
            detail,
            problem: true,
        };
    default:
        return {title: `${name}: cannot be checked (${report.result})`, detail, problem: false};
    }
}

/** One PCI device object: a submenu with its state and actions. */
class DeviceRow {
    constructor(indicator, object, proxy) {
        this._indicator = indicator;
        this.object = object;
        this.proxy = proxy;
        this.path = object.get_object_path();
        /** InUseBy as last read ([] when never read or unknown). */
        this._users = [];
        /** READ_ON_OPEN by name: as the object manager read them, then
         * read again each time the submenu opens (no change signal). */
        this._readOnOpen = {};
        for (const name of READ_ON_OPEN)
            this._readOnOpen[name] = this.proxy.get_cached_property(name)?.recursiveUnpack() ?? null;
        this._actionRunning = null;
        this._actionError = null;
        /** Was ready and is not any more (noticed while watching). */
        this.lostReadiness = false;
        this.item = new PopupMenu.PopupSubMenuMenuItem('', false);
        wrap(this.item.label);
        this.item.menu.connect('open-state-changed', (_menu, open) => {
            if (open)
                this._indicator.readOnOpen(this);
        });
        this.update();
    }

    prop(name) {
        const value = this.proxy.get_cached_property(name);
        return value ? value.deepUnpack() : null;
    }

    get address() {
        return this.prop('Address') ?? this.path;
    }

    get driver() {
        return this.prop('Driver') ?? '';
    }

    get iommuGroup() {
        return this.prop('IommuGroup') ?? -1;
    }

    get ready() {
        return this.prop('PassthroughReady') === true;
    }

    get name() {
        const names = [this.prop('VendorName'), this.prop('DeviceName')].filter(n => n);
        if (names.length > 0)
            return names.join(' ');
        const id = n => (n ?? 0).toString(16).padStart(4, '0');
        const kind = PCI_CLASSES[(this.prop('Class') ?? 0) >> 16] ?? 'PCI device';
        return `${kind} [${id(this.prop('VendorId'))}:${id(this.prop('DeviceId'))}]`;
    }

    /** Properties changed: `changed` is their a{sv}. */
    propertiesChanged(changed) {
        const ready = changed.lookup_value('PassthroughReady', null);
        if (ready !== null) {
            if (ready.get_boolean())
                this.lostReadiness = false;
            else if (this._wasReady)
                this.lostReadiness = true;
        }
        this.update();
        return this.lostReadiness && ready !== null && !ready.get_boolean();
    }

    get hasUsers() {
        return this._users.length > 0;
    }

    setUsers(users) {
        this._users = users;
        this.update();
    }

    setReadOnOpen(name, value) {
        // Rebuilding the open submenu for nothing would move its focus.
        if (JSON.stringify(this._readOnOpen[name]) === JSON.stringify(value))
            return;
        this._readOnOpen[name] = value;
        this.update();
    }

    update() {
        this._wasReady = this.ready;
        const holders = this._users.map(u =>
            u['vm-name'] ? `VM "${u['vm-name']}" (PID ${u.pid})` : `PID ${u.pid}`);
        let state;
        if (holders.length > 0)
            state = `in use by ${holders.join(', ')}`;
        else if (this.ready)
            state = 'ready for passthrough';
        else
            state = this.lostReadiness ? 'not ready any more' : 'not ready';
        this.item.label.text = `${this.address} ${this.name} — ${state}`;
        this.item.label.remove_style_class_name('vmmanager-attention');
        if (this.lostReadiness)
            this.item.label.add_style_class_name('vmmanager-attention');

        const menu = this.item.menu;
        menu.removeAll();
        const driver = this.driver ? `Driver: ${this.driver}` : 'No driver';
        const group = this.iommuGroup >= 0 ? `IOMMU group ${this.iommuGroup}` : 'no IOMMU group';
        menu.addMenuItem(infoItem(`${driver} · ${group}`));
        const pf = this.prop('PhysicalFunction');
        if (pf)
            menu.addMenuItem(infoItem(`Virtual function of ${pf}`));
        if (this.ready) {
            menu.addMenuItem(infoItem('Ready for passthrough'));
        } else {
            const blockers = this.prop('PassthroughBlockers') ?? [];
            menu.addMenuItem(infoItem(['Not ready:', ...blockers.map(b => `• ${b}`)].join('\n')));
        }
        if (holders.length > 0)
            menu.addMenuItem(infoItem(`In use by ${holders.join(', ')}`));
        // Detach's auto-return and persistent, as vmctl set them.
        if (this._readOnOpen.AutoReturn === true)
            menu.addMenuItem(infoItem('Returns to its host driver when its VM stops'));
        const claimedFor = this._readOnOpen.PersistentDriver;
        if (claimedFor) {
            const by = CLAIMED_BY[this._readOnOpen.PersistentOrigin] ?? '';
            menu.addMenuItem(infoItem(`Claimed for ${claimedFor} at boot${by}`));
        }

        const vfio = isVfioDriver(this.driver);
        // What Detach would refuse for (moot once it is on vfio-pci).
        const hostUses = this._readOnOpen.HostUsers ?? [];
        if (!vfio && hostUses.length > 0) {
            const uses = hostUses.map(u => `• ${u.text}`);
            menu.addMenuItem(infoItem(['Used by the host:', ...uses].join('\n'), 'vmmanager-attention'));
        }
        const method = vfio ? 'Reattach' : 'Detach';
        const label = this._actionRunning
            ? `${this._actionRunning === 'Detach' ? 'Detaching' : 'Reattaching'}…`
            : vfio ? 'Reattach to its host driver' : 'Detach for passthrough (vfio-pci)';
        const action = actionItem(label, () => this._indicator.callDevice(this, method));
        action.setSensitive(this._actionRunning === null);
        menu.addMenuItem(action);
        if (this._actionError)
            menu.addMenuItem(infoItem(this._actionError, 'vmmanager-error'));
    }

    actionStarted(method) {
        this._actionRunning = method;
        this._actionError = null;
        this.update();
    }

    actionFinished(method, error) {
        this._actionRunning = null;
        this._actionError = error ? `${method} failed: ${error}` : null;
        this.update();
    }

    destroy() {
        this.destroyed = true;
        this.item.destroy();
    }
}

const VmManagerIndicator = GObject.registerClass(
class VmManagerIndicator extends PanelMenu.Button {
    _init() {
        super._init(0.5, 'VM Manager', false);
        this._cancellable = new Gio.Cancellable();
        this._bus = null;
        this._manager = null;
        this._objects = null;
        /** object path → DeviceRow */
        this._devices = new Map();
        this._checks = [];
        this._attention = false;
        this._inUseQueue = [];
        this._inUseBusy = false;
        this._startError = null;
        /** NameOwnerChanged subscription while waiting to follow again. */
        this._ownerWatch = null;
        /** The session's user: DiskChecked reaches every local user, the
         * menu shows only this user's own checks. */
        this._uid = Gio.Credentials.new().get_unix_user();

        this._icon = new St.Icon({icon_name: ICON, style_class: 'system-status-icon'});
        this.add_child(this._icon);
        this._buildMenu();
        this.menu.connect('open-state-changed', (_menu, open) => {
            if (!open)
                return;
            // Looking at the menu acknowledges what needed attention.
            this._setAttention(false);
            this._devices.forEach(row => this._queueInUse(row));
        });
        this._updateService();
        this._connect();
    }

    _buildMenu() {
        this._serviceItem = infoItem('', 'vmmanager-heading');
        this.menu.addMenuItem(this._serviceItem);
        this._startItem = actionItem('Start the service', () => this._startService());
        this.menu.addMenuItem(this._startItem);
        this._serviceErrorItem = infoItem('', 'vmmanager-error');
        this.menu.addMenuItem(this._serviceErrorItem);

        this.menu.addMenuItem(new PopupMenu.PopupSeparatorMenuItem('PCI devices'));
        this._noDevicesItem = infoItem('No PCI devices', 'vmmanager-dim');
        this.menu.addMenuItem(this._noDevicesItem);
        // Devices scroll when they do not fit (a host has dozens); the
        // section stays the menu's child, so items behave as usual.
        this._devicesSection = new PopupMenu.PopupMenuSection();
        this.menu.addMenuItem(this._devicesSection);
        const index = this.menu.box.get_children().indexOf(this._devicesSection.actor);
        this.menu.box.remove_child(this._devicesSection.actor);
        this._devicesScroll = new St.ScrollView({
            style_class: 'vmmanager-devices',
            hscrollbar_policy: St.PolicyType.NEVER,
            vscrollbar_policy: St.PolicyType.AUTOMATIC,
            overlay_scrollbars: true,
            x_expand: true,
        });
        // GNOME 43-45 St.ScrollView takes its scrolled child only through
        // add_actor (set_child leaves it sized 0); 46 removed add_actor.
        if (typeof this._devicesScroll.add_actor === 'function')
            this._devicesScroll.add_actor(this._devicesSection.actor);
        else
            this._devicesScroll.set_child(this._devicesSection.actor);
        this.menu.box.insert_child_at_index(this._devicesScroll, index);

        this.menu.addMenuItem(new PopupMenu.PopupSeparatorMenuItem('Recent disk checks'));
        this._noChecksItem = infoItem('No disk checks in this session', 'vmmanager-dim');
        this.menu.addMenuItem(this._noChecksItem);
        this._checksSection = new PopupMenu.PopupMenuSection();
        this.menu.addMenuItem(this._checksSection);
    }

    _connect() {
        Gio.bus_get(Gio.BusType.SYSTEM, this._cancellable, (_source, result) => {
            try {
                this._bus = Gio.bus_get_finish(result);
            } catch (e) {
                if (!isCancelled(e))
                    this._showServiceError(`No system bus: ${e.message}`);
                return;
            }
            Gio.DBusProxy.new(this._bus, Gio.DBusProxyFlags.DO_NOT_AUTO_START, null,
                BUS_NAME, MANAGER_PATH, MANAGER_IFACE, this._cancellable,
                (_s, res) => this._managerReady(res));
            this._followObjects();
        });
    }

    _followObjects() {
        const objects = new Gio.DBusObjectManagerClient({
            connection: this._bus,
            flags: Gio.DBusObjectManagerClientFlags.DO_NOT_AUTO_START,
            name: BUS_NAME,
            object_path: MANAGER_PATH,
        });
        objects.init_async(GLib.PRIORITY_DEFAULT, this._cancellable, (_s, res) => {
            try {
                objects.init_finish(res);
            } catch (e) {
                if (isCancelled(e))
                    return;
                this._showServiceError(`Cannot follow the service: ${e.message}`);
                this._retryOnOwnerChange(objects.name_owner);
                return;
            }
            this._objectsReady(objects);
        });
    }

    /** A client whose GetManagedObjects failed at init (an owner that never
     * answered) is dead for good: make a new one once the name changes
     * hands, which may already have happened while the call waited. */
    _retryOnOwnerChange(failedOwner) {
        this._ownerWatch = this._bus.signal_subscribe('org.freedesktop.DBus',
            'org.freedesktop.DBus', 'NameOwnerChanged', '/org/freedesktop/DBus', BUS_NAME,
            Gio.DBusSignalFlags.NONE, () => this._retryObjects());
        this._bus.call('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus',
            'GetNameOwner', new GLib.Variant('(s)', [BUS_NAME]), new GLib.VariantType('(s)'),
            Gio.DBusCallFlags.NONE, -1, this._cancellable, (bus, result) => {
                let owner = null;
                try {
                    [owner] = bus.call_finish(result).deepUnpack();
                } catch (e) {
                    if (isCancelled(e))
                        return;
                }
                if (owner !== failedOwner)
                    this._retryObjects();
            });
    }

    _retryObjects() {
        if (this._ownerWatch === null)
            return;
        this._bus.signal_unsubscribe(this._ownerWatch);
        this._ownerWatch = null;
        this._followObjects();
    }

    _managerReady(result) {
        try {
            this._manager = Gio.DBusProxy.new_finish(result);
        } catch (e) {
            if (!isCancelled(e))
                this._showServiceError(`Cannot reach the service: ${e.message}`);
            return;
        }
        this._manager.connectObject(
            'notify::g-name-owner', () => this._updateService(),
            'g-properties-changed', () => this._updateService(),
            'g-signal', (_proxy, _sender, signal, parameters) => {
                if (signal === 'DiskChecked')
                    this._diskChecked(...parameters.recursiveUnpack());
            },
            this);
        this._updateService();
    }

    _objectsReady(objects) {
        this._objects = objects;
        objects.connectObject(
            'object-added', (_om, object) => this._addObject(object),
            // Also for every object when the service goes away, with their
            // interfaces still attached.
            'object-removed', (_om, object) => this._removeDevice(object.get_object_path()),
            'interface-added', (_om, object) => this._addObject(object),
            'interface-removed', (_om, object, iface) => {
                if (iface.get_interface_name() === DEVICE_IFACE)
                    this._removeDevice(object.get_object_path());
            },
            'interface-proxy-properties-changed', (_om, object, proxy, changed) =>
                this._deviceChanged(object, proxy, changed),
            this);
        objects.get_objects().forEach(object => this._addObject(object));
    }

    _addObject(object) {
        const proxy = object.get_interface(DEVICE_IFACE);
        const path = object.get_object_path();
        if (!proxy || this._devices.has(path))
            return;
        const row = new DeviceRow(this, object, proxy);
        this._devices.set(path, row);
        // Sorted by address, as `vmctl devices` lists them.
        const rows = [...this._devices.values()].sort((a, b) => a.address.localeCompare(b.address));
        this._devicesSection.addMenuItem(row.item, rows.indexOf(row));
        this._updateDeviceCount();
        this._queueInUse(row);
    }

    _removeDevice(path) {
        const row = this._devices.get(path);
        if (!row)
            return;
        this._devices.delete(path);
        row.destroy();
        this._inUseQueue = this._inUseQueue.filter(r => r !== row);
        this._updateDeviceCount();
    }

    _deviceChanged(object, proxy, changed) {
        const row = this._devices.get(object.get_object_path());
        if (!row || proxy.get_interface_name() !== DEVICE_IFACE)
            return;
        if (row.propertiesChanged(changed))
            this._setAttention(true);
        if (changed.lookup_value('Driver', null) !== null)
            this._devices.forEach(r => this._queueInUse(r));
    }

    _updateDeviceCount() {
        this._noDevicesItem.visible = this._devices.size === 0;
        this._noDevicesItem.label.text = this._serviceRunning()
            ? 'No PCI devices' : 'Shown when the service runs';
    }

    _serviceRunning() {
        return this._manager !== null && this._manager.g_name_owner !== null;
    }

    _updateService() {
        const running = this._serviceRunning();
        let text;
        if (running) {
            const version = this._manager.get_cached_property('Version')?.deepUnpack();
            const jobs = this._manager.get_cached_property('Jobs')?.deepUnpack() ?? [];
            text = `VM Manager ${version ?? ''} — running`.replace('  ', ' ');
            if (jobs.length > 0)
                text += `, ${plural(jobs.length, 'disk check', 'disk checks')} in progress`;
            this._startError = null;
        } else {
            text = 'VM Manager service is not running';
        }
        this._serviceItem.label.text = text;
        this._startItem.visible = this._manager !== null && !running;
        this._serviceErrorItem.visible = this._startError !== null;
        this._serviceErrorItem.label.text = this._startError ?? '';
        this._icon.opacity = running ? 255 : 128;
        this._updateDeviceCount();
    }

    _showServiceError(message) {
        this._startError = message;
        this._updateService();
    }

    /** Activates the service (any call does, unlike our watchers). */
    _startService() {
        this._bus.call(BUS_NAME, MANAGER_PATH, PROPERTIES_IFACE, 'Get',
            new GLib.Variant('(ss)', [MANAGER_IFACE, 'Version']), null,
            Gio.DBusCallFlags.NONE, -1, this._cancellable, (bus, result) => {
                try {
                    bus.call_finish(result);
                } catch (e) {
                    if (!isCancelled(e))
                        this._showServiceError(`Could not start the service: ${errorText(e)}`);
                }
            });
    }

    /** Detach or Reattach, letting polkit's agent ask for a password. */
    callDevice(row, method) {
        row.actionStarted(method);
        this._bus.call(BUS_NAME, row.path, DEVICE_IFACE, method,
            new GLib.Variant('(a{sv})', [{}]), null,
            Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION, INTERACTIVE_TIMEOUT_MS,
            this._cancellable, (bus, result) => {
                let error = null;
                try {
                    bus.call_finish(result);
                } catch (e) {
                    if (isCancelled(e))
                        return;
                    error = errorText(e);
                }
                if (!row.destroyed)
                    row.actionFinished(method, error);
            });
    }

    /** InUseBy sends no change signals: read it (one device at a time, the
     * service bounds concurrent scans) when a VFIO group may be held. */
    _queueInUse(row) {
        const groupOnVfio = [...this._devices.values()].some(r =>
            r.iommuGroup >= 0 && r.iommuGroup === row.iommuGroup && isVfioDriver(r.driver));
        if (!groupOnVfio) {
            if (row.hasUsers)
                row.setUsers([]);
            return;
        }
        if (!this._inUseQueue.includes(row))
            this._inUseQueue.push(row);
        this._nextInUse();
    }

    _nextInUse() {
        if (this._inUseBusy || this._bus === null)
            return;
        const row = this._inUseQueue.shift();
        if (!row)
            return;
        this._inUseBusy = true;
        this._bus.call(BUS_NAME, row.path, PROPERTIES_IFACE, 'Get',
            new GLib.Variant('(ss)', [DEVICE_IFACE, 'InUseBy']), new GLib.VariantType('(v)'),
            Gio.DBusCallFlags.NO_AUTO_START, IN_USE_TIMEOUT_MS, this._cancellable,
            (bus, result) => {
                let users = [];
                try {
                    users = bus.call_finish(result).recursiveUnpack()[0];
                } catch (e) {
                    if (isCancelled(e))
                        return;
                }
                this._inUseBusy = false;
                if (!row.destroyed)
                    row.setUsers(users);
                this._nextInUse();
            });
    }

    /** READ_ON_OPEN have no change signal: read when the device's
     * submenu opens, each on its own (HostUsers may take seconds; the
     * service bounds concurrent reads, and an unknown answer is an entry of
     * its own, never an empty list). A failed read keeps the last value. */
    readOnOpen(row) {
        if (this._bus === null)
            return;
        for (const name of READ_ON_OPEN) {
            this._bus.call(BUS_NAME, row.path, PROPERTIES_IFACE, 'Get',
                new GLib.Variant('(ss)', [DEVICE_IFACE, name]), new GLib.VariantType('(v)'),
                Gio.DBusCallFlags.NO_AUTO_START, IN_USE_TIMEOUT_MS, this._cancellable,
                (bus, result) => {
                    let value;
                    try {
                        value = bus.call_finish(result).recursiveUnpack()[0];
                    } catch (e) {
                        return;
                    }
                    if (!row.destroyed)
                        row.setReadOnOpen(name, value);
                });
        }
    }

    /** Whether a check is this user's: started by them, or of an image of
     * theirs (qemu-img runs as the image's owner). Another user's checks
     * would otherwise bury this user's results or fake a warning. */
    _isOwnCheck(report) {
        return report['started-by-uid'] === this._uid || report['run-as-uid'] === this._uid;
    }

    _diskChecked(image, report) {
        if (!this._isOwnCheck(report))
            return;
        const check = describeCheck(image, report);
        const item = infoItem('', check.problem ? 'vmmanager-attention' : 'vmmanager-check');
        const escape = text => GLib.markup_escape_text(text, -1);
        item.label.clutter_text.set_markup(
            `${escape(check.title)}\n<span size="smaller" foreground="#c0bfbc">${escape(check.detail)}</span>`);
        this._checksSection.addMenuItem(item, 0);
        this._checks.unshift(item);
        this._checks.splice(MAX_CHECKS).forEach(old => old.destroy());
        this._noChecksItem.visible = false;
        if (check.problem)
            this._setAttention(true);
    }

    _setAttention(attention) {
        this._attention = attention;
        this._icon.icon_name = attention ? ATTENTION_ICON : ICON;
        if (attention)
            this._icon.add_style_class_name('vmmanager-attention');
        else
            this._icon.remove_style_class_name('vmmanager-attention');
    }

    get attention() {
        return this._attention;
    }

    /** Before PanelMenu.Button destroys the menu (and every row in it). */
    _onDestroy() {
        this._cancellable.cancel();
        if (this._ownerWatch !== null)
            this._bus.signal_unsubscribe(this._ownerWatch);
        this._ownerWatch = null;
        this._manager?.disconnectObject(this);
        this._objects?.disconnectObject(this);
        this._devices.forEach(row => {
            row.destroyed = true;
        });
        this._devices.clear();
        this._inUseQueue = [];
        this._manager = null;
        this._objects = null;
        this._bus = null;
        super._onDestroy();
    }
});

export default class VmManagerExtension extends Extension {
    enable() {
        this._indicator = new VmManagerIndicator();
        Main.panel.addToStatusArea(ROLE, this._indicator);
        Main.sessionMode.connectObject('updated', () => this._showUnlessLocked(), this);
        this._showUnlessLocked();
    }

    /** Nothing of it on the lock screen (device names, image paths, actions);
     * it keeps listening behind it. */
    _showUnlessLocked() {
        const locked = Main.sessionMode.isLocked;
        if (locked)
            this._indicator.menu.close();
        this._indicator.visible = !locked;
    }

    // metadata.json lists the unlock-dialog session mode so that locking the
    // screen does not disable the extension: disabled, it would lose the
    // session's disk checks and what needs attention, and miss the checks
    // that finish while the screen is locked (DiskChecked is a signal, never
    // sent again). While locked the indicator is hidden and its menu closed
    // (_showUnlessLocked); it only keeps listening to the system bus.
    disable() {
        Main.sessionMode.disconnectObject(this);
        this._indicator.destroy();
        this._indicator = null;
    }
}
