# VM Manager -- build, install and test.
#
#   make                      build release binaries (cargo build --release --locked),
#                             then generate shell completions and man pages from
#                             them into $(TARGET_DIR)/completions and /man, and
#                             the GNOME Shell extension's two builds into
#                             $(TARGET_DIR)/gnome-shell/{esm,legacy} (python3)
#   make check                validate the data files, run the test suite
#   make bench                as root: issue 10's performance figures beside their
#                             baselines (release build; several minutes); a table
#                             on stdout, JSON in $(TARGET_DIR)/bench/*.json
#   make bench-quick          the same with small samples (CI, under 2 minutes;
#                             fails only on errors, never on times); also
#                             `make bench QUICK=1`
#   make deb                  the Debian package, $(DEB_BUILD_DIR)/vmmanager_<version>_<arch>.deb:
#                             builds, stages `make install PREFIX=/usr` and packs
#                             that tree with dpkg-deb (scripts/build-deb says why
#                             not cargo-deb); needs dpkg-dev, not root
#   make check-deb            make deb, then check the package's files, modes,
#                             control data and maintainer scripts (and lintian
#                             when installed) without installing it
#   make gnome-shell-check-esm  optional, as root: the GNOME 45+ build of the
#                             extension in GNOME Shell 48 (a Debian 13 chroot,
#                             debootstrapped once into /var/cache); not in CI
#   make install              install (as root, after `make`; never builds)
#   make uninstall            remove everything `make install` put in place
#
# Variables (override on the command line, e.g. `make install PREFIX=/usr`):
#   PREFIX=/usr/local   binaries, interface XML, man pages, shell completions
#   DESTDIR=            staging root for packaging; prepended to every path
#
# Where things go, and why not everything follows PREFIX: the files read by
# system daemons must be where those daemons look, whatever PREFIX is.
#   $(PREFIX)/bin/vmctl                        CLI (and vmmanager-notify if built)
#   $(PREFIX)/libexec/vmmanagerd               daemon, started by D-Bus/systemd only
#   $(PREFIX)/libexec/vmmanager-opener         opens images for repairs, started by
#                                              vmmanager-opener.socket only
#   $(PREFIX)/libexec/vmmanager-vfio-claim     binds a device claimed for vfio-pci
#                                              at boot, run by the udev rule only
#   $(PREFIX)/share/dbus-1/interfaces/         introspection XML (for developers)
#   $(PREFIX)/share/man/man1, man8/            vmctl(1), vmctl-*(1), vmmanager-notify(1),
#                                              vmmanagerd(8), vmmanager-opener(8),
#                                              vmmanager-vfio-claim(8) (udev/, by hand)
#   $(PREFIX)/share/bash-completion/completions/vmctl, fish/vendor_completions.d/
#                                              completions; zsh: zsh/vendor-completions
#                                              if PREFIX=/usr, else zsh/site-functions
#                                              (MANDIR, BASH_/ZSH_/FISH_COMPLETIONSDIR)
#   /usr/share/dbus-1/system.d/                bus policy: dbus-daemon reads only
#                                              this and /etc/dbus-1/system.d (the
#                                              latter is the admin's)
#   /usr/share/dbus-1/system-services/         bus activation file
#   /usr/share/polkit-1/actions/               polkit reads actions only here
#   $(UDEVRULESDIR) (/usr/lib/udev/rules.d)    89-vmmanager-vfio.rules (boot-time
#                                              claims, with driverctl or without); from udev.pc
#                                              when available, /lib read as /usr/lib
#   /etc/driverctl.d/                          driverctl's override directory, made
#                                              (empty) so the sandboxed daemon may
#                                              write claims there (ReadWritePaths=);
#                                              uninstall leaves it (driverctl's too,
#                                              and the claims in it are the admin's)
#   $(SYSTEMDUNITDIR) (/usr/lib/systemd/system) systemd units; from systemd.pc when
#                                              available (distribution's unit dir,
#                                              /lib/... read as /usr/lib/...)
#   $(AUTOSTARTDIR) (/etc/xdg/autostart)       vmmanager-notify.desktop: session
#                                              managers read autostart entries only
#                                              from $XDG_CONFIG_DIRS/autostart
#   $(SYSTEMDUSERUNITDIR) (/usr/lib/systemd/user)  vmmanager-notify.service (user
#                                              unit); from systemd.pc when available
#   $(GNOME_SHELL_EXTENSIONDIR)/vmmanager@example.org/  the GNOME Shell extension
#                                              ($(DATADIR)/gnome-shell/extensions: the
#                                              shell looks in $XDG_DATA_DIRS); one
#                                              build of it, GNOME_SHELL_API (below)
# Each of these has its own variable (DBUS_POLICYDIR, DBUS_SERVICEDIR,
# POLKIT_ACTIONDIR, SYSTEMDUNITDIR, AUTOSTARTDIR, SYSTEMDUSERUNITDIR) for
# distributions that differ.
#
# The GNOME Shell extension comes in two builds from one source
# (desktop/gnome-shell): "esm" for GNOME 45 and later (ES modules), "legacy"
# for GNOME 43 and 44 (imports); neither loads in the other's shells.
# `make install` installs the one for the gnome-shell installed on this
# machine (gnome-shell --version), "legacy" when there is none (Debian 12's
# GNOME is 43, and `make deb` builds Debian 12's package). Override with
# GNOME_SHELL_API=esm or GNOME_SHELL_API=legacy (e.g. when packaging for
# another release than the build machine's).
#
# The bus activation file and the systemd units name the daemon (and the
# opener) by absolute path. Their sources carry the default
# /usr/local/libexec/...; install writes the real $(LIBEXECDIR) into the
# installed copies with sed. The same for the user unit and
# /usr/local/bin/vmmanager-notify ($(BINDIR)).

PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR    ?= $(PREFIX)/share
DBUS_INTERFACESDIR ?= $(DATADIR)/dbus-1/interfaces
MANDIR     ?= $(DATADIR)/man
# Where each shell looks by itself: bash-completion and fish search
# $XDG_DATA_DIRS (which has /usr/local/share); Debian's zsh reads
# /usr/share/zsh/vendor-completions but, under /usr/local, only site-functions.
BASH_COMPLETIONSDIR ?= $(DATADIR)/bash-completion/completions
ZSH_COMPLETIONSDIR  ?= $(if $(filter /usr,$(PREFIX)),$(DATADIR)/zsh/vendor-completions,$(DATADIR)/zsh/site-functions)
FISH_COMPLETIONSDIR ?= $(DATADIR)/fish/vendor_completions.d

DBUS_POLICYDIR   ?= /usr/share/dbus-1/system.d
DBUS_SERVICEDIR  ?= /usr/share/dbus-1/system-services
POLKIT_ACTIONDIR ?= /usr/share/polkit-1/actions
# Debian 12's systemd.pc still says /lib/systemd/system. Staged under
# DESTDIR that makes a top-level lib/ directory, which cannot be copied onto
# a merged-/usr system (there /lib is a symlink to usr/lib), so /lib/... is
# mapped to /usr/lib/...: systemd reads both on every Debian (on merged-/usr
# they are the same directory), and everything stays under /usr and /etc.
SYSTEMDUNITDIR   ?= $(patsubst /lib/%,/usr/lib/%,$(shell pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null))
# pkg-config may be missing, or present but print nothing.
ifeq ($(strip $(SYSTEMDUNITDIR)),)
SYSTEMDUNITDIR = /usr/lib/systemd/system
endif
# udev reads rules in /usr/lib/udev/rules.d on every Debian (see SYSTEMDUNITDIR).
UDEVRULESDIR     ?= $(patsubst /lib/%,/usr/lib/%,$(shell pkg-config --variable=udevdir udev 2>/dev/null))/rules.d
ifeq ($(strip $(UDEVRULESDIR)),/rules.d)
UDEVRULESDIR = /usr/lib/udev/rules.d
endif
# driverctl's override directory (boot-time claims; src/devices/persistent.rs).
DRIVERCTLDIR     ?= /etc/driverctl.d
AUTOSTARTDIR       ?= /etc/xdg/autostart
GNOME_SHELL_EXTENSIONDIR ?= $(DATADIR)/gnome-shell/extensions
GNOME_SHELL_API ?= $(shell gnome-shell --version 2>/dev/null | \
    sed -n 's/^GNOME Shell \([0-9][0-9]*\).*/\1/p' | awk '{ print ($$1 >= 45) ? "esm" : "legacy" }')
ifeq ($(strip $(GNOME_SHELL_API)),)
GNOME_SHELL_API = legacy
endif
SYSTEMDUSERUNITDIR ?= $(patsubst /lib/%,/usr/lib/%,$(shell pkg-config --variable=systemduserunitdir systemd 2>/dev/null))
ifeq ($(strip $(SYSTEMDUSERUNITDIR)),)
SYSTEMDUSERUNITDIR = /usr/lib/systemd/user
endif

CARGO      ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
RELEASE    := $(TARGET_DIR)/release
# `make deb` stages into $(DEB_BUILD_DIR)/debian/vmmanager (the layout
# dpkg-shlibdeps expects) and writes the .deb into $(DEB_BUILD_DIR).
DEB_BUILD_DIR := $(TARGET_DIR)/deb
# Generated by `make` from the release binaries (see `generate`).
COMPLETIONS_OUT := $(TARGET_DIR)/completions
MAN_OUT         := $(TARGET_DIR)/man
GNOME_SHELL_OUT := $(TARGET_DIR)/gnome-shell

INSTALL      ?= install
INSTALL_PROG := $(INSTALL) -m 0755
INSTALL_DATA := $(INSTALL) -m 0644

# The paths baked into the sources (see above).
SOURCE_LIBEXECDIR := /usr/local/libexec
SOURCE_BINDIR     := /usr/local/bin

BUS_NAME       := org.example.VmManager
BUS_POLICY_FILE := dbus/$(BUS_NAME).conf
SERVICE_FILE   := dbus/$(BUS_NAME).service
INTERFACE_XML  := dbus/org.example.VmManager1.xml
POLKIT_FILE    := polkit/org.example.vmmanager.policy
UNIT_FILE      := systemd/vmmanagerd.service
# vmmanager-opener: its socket and the service it starts per connection.
OPENER_SOCKET  := systemd/vmmanager-opener.socket
OPENER_UNIT    := systemd/vmmanager-opener@.service
NOTIFY_DESKTOP := desktop/vmmanager-notify.desktop
NOTIFY_UNIT    := systemd/user/vmmanager-notify.service
# Boot-time claims: the udev rule and the helper it runs (and asks).
UDEV_RULE      := udev/89-vmmanager-vfio.rules
VFIO_CLAIM     := udev/vmmanager-vfio-claim
GNOME_SHELL_UUID := vmmanager@example.org
GNOME_SHELL_BUILD := $(GNOME_SHELL_OUT)/$(GNOME_SHELL_API)/$(GNOME_SHELL_UUID)

.PHONY: all build generate gnome-shell-extension check check-data bench bench-quick install uninstall clean deb check-deb

all: build generate gnome-shell-extension

build:
	$(CARGO) build --release --locked

# Completions and man pages come from the binaries' own clap definitions
# (hidden `vmctl generate`, `vmmanagerd --generate-man` and
# `vmmanager-notify --generate-man`), so they always match --help.
generate: build
	rm -rf $(COMPLETIONS_OUT) $(MAN_OUT)
	mkdir -p $(COMPLETIONS_OUT) $(MAN_OUT)
	$(RELEASE)/vmctl generate completions bash > $(COMPLETIONS_OUT)/vmctl.bash
	$(RELEASE)/vmctl generate completions zsh > $(COMPLETIONS_OUT)/_vmctl
	$(RELEASE)/vmctl generate completions fish > $(COMPLETIONS_OUT)/vmctl.fish
	$(RELEASE)/vmctl generate man $(MAN_OUT)
	$(RELEASE)/vmmanagerd --generate-man $(MAN_OUT)
	$(RELEASE)/vmmanager-notify --generate-man $(MAN_OUT)

# Both builds of the GNOME Shell extension (desktop/gnome-shell/build.py says
# how one source becomes both).
gnome-shell-extension:
	python3 desktop/gnome-shell/build.py $(GNOME_SHELL_OUT)

# Optional, not in CI: load the GNOME 45+ build in GNOME Shell 48 (a cached
# Debian 13 chroot made with debootstrap; as root, needs network once).
.PHONY: gnome-shell-check-esm
gnome-shell-check-esm: gnome-shell-extension
	desktop/gnome-shell/check-esm $(GNOME_SHELL_OUT)

# The same tests as scripts/test, without its root check and dependency
# installation (the end-to-end tests need root and the packages of
# scripts/install-deps; `scripts/test`, as root, sets both up).
check: check-data
	$(CARGO) test --locked

# Benchmarks (benches/perf): `cargo bench` builds the release profile.
# BENCH_GROUPS picks some of disk, scan, uevents, service (default: all).
BENCH_GROUPS ?=
bench:
	$(CARGO) bench --locked --bench perf -- $(if $(filter 1,$(QUICK)),--quick) $(BENCH_GROUPS)

bench-quick:
	$(MAKE) bench QUICK=1

# Well-formedness of the XML files (and the polkit policy against polkit's
# DTD), and the units' syntax. Each tool is optional: skipped when missing.
# --man=no: the units' Documentation= page is generated by `make`, not
# installed yet. What verify says of the host's own units (it loads their
# dependencies) is not about ours.
check-data:
	@if command -v xmllint >/dev/null 2>&1; then \
	    set -e; \
	    xmllint --noout $(BUS_POLICY_FILE); \
	    if [ -r /usr/share/polkit-1/policyconfig-1.dtd ]; then \
	        xmllint --noout --dtdvalid /usr/share/polkit-1/policyconfig-1.dtd $(POLKIT_FILE); \
	    else \
	        xmllint --noout $(POLKIT_FILE); \
	    fi; \
	    if [ -f $(INTERFACE_XML) ]; then xmllint --noout $(INTERFACE_XML); fi; \
	    echo "check-data: XML files OK"; \
	else \
	    echo "check-data: xmllint not found (apt install libxml2-utils), XML not validated"; \
	fi
	@if command -v systemd-analyze >/dev/null 2>&1; then \
	    out=$$(systemd-analyze verify --man=no $(UNIT_FILE) $(OPENER_SOCKET) $(OPENER_UNIT) 2>&1 | \
	        grep -v -e 'is not executable' -e '^/lib/systemd/' -e '^/usr/lib/systemd/' -e '^/etc/systemd/' || true); \
	    if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; \
	    echo "check-data: $(UNIT_FILE) $(OPENER_SOCKET) $(OPENER_UNIT) OK"; \
	fi

# Installs what `make` built; never builds itself, so that `sudo make install`
# does not leave root-owned files in target/.
install:
	@for b in vmctl vmmanagerd vmmanager-notify vmmanager-opener; do \
	    if [ ! -x $(RELEASE)/$$b ]; then \
	        echo "$(RELEASE)/$$b is missing: run 'make' first" >&2; exit 1; \
	    fi; \
	done
	@if [ ! -f $(MAN_OUT)/vmctl.1 ] || [ ! -f $(COMPLETIONS_OUT)/_vmctl ]; then \
	    echo "$(MAN_OUT) or $(COMPLETIONS_OUT) is missing: run 'make' first" >&2; exit 1; \
	fi
	@if [ "$(GNOME_SHELL_API)" != esm ] && [ "$(GNOME_SHELL_API)" != legacy ]; then \
	    echo "GNOME_SHELL_API must be esm or legacy, not '$(GNOME_SHELL_API)'" >&2; exit 1; \
	fi
	@if [ ! -f $(GNOME_SHELL_BUILD)/metadata.json ]; then \
	    echo "$(GNOME_SHELL_BUILD) is missing: run 'make' first" >&2; exit 1; \
	fi
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBEXECDIR) \
	    $(DESTDIR)$(DBUS_POLICYDIR) $(DESTDIR)$(DBUS_SERVICEDIR) \
	    $(DESTDIR)$(POLKIT_ACTIONDIR) $(DESTDIR)$(SYSTEMDUNITDIR) \
	    $(DESTDIR)$(AUTOSTARTDIR) $(DESTDIR)$(SYSTEMDUSERUNITDIR) \
	    $(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(DRIVERCTLDIR)
	$(INSTALL_PROG) $(RELEASE)/vmctl $(DESTDIR)$(BINDIR)/vmctl
	$(INSTALL_PROG) $(RELEASE)/vmmanager-notify $(DESTDIR)$(BINDIR)/vmmanager-notify
	$(INSTALL_DATA) $(NOTIFY_DESKTOP) $(DESTDIR)$(AUTOSTARTDIR)/vmmanager-notify.desktop
	sed -e 's|$(SOURCE_BINDIR)/|$(BINDIR)/|g' $(NOTIFY_UNIT) \
	    > $(DESTDIR)$(SYSTEMDUSERUNITDIR)/vmmanager-notify.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUSERUNITDIR)/vmmanager-notify.service
	$(INSTALL_PROG) $(RELEASE)/vmmanagerd $(DESTDIR)$(LIBEXECDIR)/vmmanagerd
	$(INSTALL_PROG) $(RELEASE)/vmmanager-opener $(DESTDIR)$(LIBEXECDIR)/vmmanager-opener
	$(INSTALL_PROG) $(VFIO_CLAIM) $(DESTDIR)$(LIBEXECDIR)/vmmanager-vfio-claim
	sed -e 's|$(SOURCE_LIBEXECDIR)/|$(LIBEXECDIR)/|g' $(UDEV_RULE) \
	    > $(DESTDIR)$(UDEVRULESDIR)/89-vmmanager-vfio.rules
	chmod 0644 $(DESTDIR)$(UDEVRULESDIR)/89-vmmanager-vfio.rules
	$(INSTALL_DATA) $(BUS_POLICY_FILE) $(DESTDIR)$(DBUS_POLICYDIR)/$(BUS_NAME).conf
	sed -e 's|$(SOURCE_LIBEXECDIR)/|$(LIBEXECDIR)/|g' $(SERVICE_FILE) \
	    > $(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service
	chmod 0644 $(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service
	$(INSTALL_DATA) $(POLKIT_FILE) $(DESTDIR)$(POLKIT_ACTIONDIR)/org.example.vmmanager.policy
	sed -e 's|$(SOURCE_LIBEXECDIR)/|$(LIBEXECDIR)/|g' $(UNIT_FILE) \
	    > $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanagerd.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanagerd.service
	$(INSTALL_DATA) $(OPENER_SOCKET) $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanager-opener.socket
	sed -e 's|$(SOURCE_LIBEXECDIR)/|$(LIBEXECDIR)/|g' $(OPENER_UNIT) \
	    > '$(DESTDIR)$(SYSTEMDUNITDIR)/vmmanager-opener@.service'
	chmod 0644 '$(DESTDIR)$(SYSTEMDUNITDIR)/vmmanager-opener@.service'
	if [ -f $(INTERFACE_XML) ]; then \
	    $(INSTALL) -d $(DESTDIR)$(DBUS_INTERFACESDIR) && \
	    $(INSTALL_DATA) $(INTERFACE_XML) $(DESTDIR)$(DBUS_INTERFACESDIR)/org.example.VmManager1.xml; \
	fi
	$(INSTALL) -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8 \
	    $(DESTDIR)$(BASH_COMPLETIONSDIR) $(DESTDIR)$(ZSH_COMPLETIONSDIR) \
	    $(DESTDIR)$(FISH_COMPLETIONSDIR)
	$(INSTALL_DATA) $(MAN_OUT)/*.1 $(DESTDIR)$(MANDIR)/man1/
	$(INSTALL_DATA) $(MAN_OUT)/*.8 $(DESTDIR)$(MANDIR)/man8/
	$(INSTALL_DATA) $(VFIO_CLAIM).8 $(DESTDIR)$(MANDIR)/man8/
	$(INSTALL_DATA) $(COMPLETIONS_OUT)/vmctl.bash $(DESTDIR)$(BASH_COMPLETIONSDIR)/vmctl
	$(INSTALL_DATA) $(COMPLETIONS_OUT)/_vmctl $(DESTDIR)$(ZSH_COMPLETIONSDIR)/_vmctl
	$(INSTALL_DATA) $(COMPLETIONS_OUT)/vmctl.fish $(DESTDIR)$(FISH_COMPLETIONSDIR)/vmctl.fish
	$(INSTALL) -d $(DESTDIR)$(GNOME_SHELL_EXTENSIONDIR)/$(GNOME_SHELL_UUID)
	$(INSTALL_DATA) $(GNOME_SHELL_BUILD)/extension.js $(GNOME_SHELL_BUILD)/metadata.json \
	    $(GNOME_SHELL_BUILD)/stylesheet.css $(DESTDIR)$(GNOME_SHELL_EXTENSIONDIR)/$(GNOME_SHELL_UUID)/
	@if [ -z "$(DESTDIR)" ]; then \
	    echo "Installed. dbus-daemon and polkitd pick up the new files by themselves;"; \
	    echo "run 'systemctl daemon-reload' so systemd sees vmmanagerd.service, and"; \
	    echo "'systemctl enable --now vmmanager-opener.socket' for repairs in directories"; \
	    echo "made after the service started. GNOME users: log out and in, then"; \
	    echo "'gnome-extensions enable $(GNOME_SHELL_UUID)' ($(GNOME_SHELL_API) build)."; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vmctl $(DESTDIR)$(BINDIR)/vmmanager-notify
	rm -f $(DESTDIR)$(LIBEXECDIR)/vmmanagerd $(DESTDIR)$(LIBEXECDIR)/vmmanager-opener \
	    $(DESTDIR)$(LIBEXECDIR)/vmmanager-vfio-claim
	rm -f $(DESTDIR)$(UDEVRULESDIR)/89-vmmanager-vfio.rules
	rm -f $(DESTDIR)$(DBUS_POLICYDIR)/$(BUS_NAME).conf
	rm -f $(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service
	rm -f $(DESTDIR)$(POLKIT_ACTIONDIR)/org.example.vmmanager.policy
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanagerd.service
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanager-opener.socket
	rm -f '$(DESTDIR)$(SYSTEMDUNITDIR)/vmmanager-opener@.service'
	rm -f $(DESTDIR)$(AUTOSTARTDIR)/vmmanager-notify.desktop
	rm -f $(DESTDIR)$(SYSTEMDUSERUNITDIR)/vmmanager-notify.service
	rm -f $(DESTDIR)$(DBUS_INTERFACESDIR)/org.example.VmManager1.xml
	rm -f $(DESTDIR)$(MANDIR)/man1/vmctl.1 $(DESTDIR)$(MANDIR)/man1/vmctl-*.1
	rm -f $(DESTDIR)$(MANDIR)/man1/vmmanager-notify.1
	rm -f $(DESTDIR)$(MANDIR)/man8/vmmanagerd.8 $(DESTDIR)$(MANDIR)/man8/vmmanager-opener.8 \
	    $(DESTDIR)$(MANDIR)/man8/vmmanager-vfio-claim.8
	rm -f $(DESTDIR)$(BASH_COMPLETIONSDIR)/vmctl $(DESTDIR)$(ZSH_COMPLETIONSDIR)/_vmctl
	rm -f $(DESTDIR)$(FISH_COMPLETIONSDIR)/vmctl.fish
	rm -f $(DESTDIR)$(GNOME_SHELL_EXTENSIONDIR)/$(GNOME_SHELL_UUID)/extension.js \
	    $(DESTDIR)$(GNOME_SHELL_EXTENSIONDIR)/$(GNOME_SHELL_UUID)/metadata.json \
	    $(DESTDIR)$(GNOME_SHELL_EXTENSIONDIR)/$(GNOME_SHELL_UUID)/stylesheet.css
	-rmdir $(DESTDIR)$(GNOME_SHELL_EXTENSIONDIR)/$(GNOME_SHELL_UUID) 2>/dev/null

# The package's file list is `make install`'s (PREFIX=/usr, so everything
# is under /usr and /etc); scripts/build-deb adds what Debian requires.
deb: all
	rm -rf $(DEB_BUILD_DIR)
	$(MAKE) install DESTDIR=$(abspath $(DEB_BUILD_DIR))/debian/vmmanager PREFIX=/usr
	scripts/build-deb $(DEB_BUILD_DIR)

check-deb: deb
	scripts/check-deb $(DEB_BUILD_DIR)/vmmanager_*.deb

clean:
	$(CARGO) clean

# System tests in a booted Debian 12 guest (tests/system; as root, needs
# debootstrap and qemu-system-x86_64). The image is built from Debian packages
# once and cached in /var/cache/vmmanager-system-test (VMM_SYSTEM_TEST_CACHE).
#   make system-test-image    build (or reuse) the cached guest image
#   make system-test-boot     boot a throwaway guest and smoke-check it: systemd,
#                             IOMMU groups, igb/e1000e, SR-IOV VFs on the igb
#   make system-test          make deb, then install it in a booted guest and check
#                             it as real users in real sessions (tests/system/README.md)
.PHONY: system-test-image system-test-boot system-test
system-test-image:
	tests/system/build-image >/dev/null

system-test: deb
	tests/system/system-test $(DEB_BUILD_DIR)/vmmanager_*.deb

system-test-boot:
	tests/system/smoke
