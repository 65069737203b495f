# VM Manager -- build, install and test.
#
#   make                      build release binaries (cargo build --release --locked)
#   make check                validate the data files, run the test suite
#   make install              install (as root, after `make`; never builds)
#   make uninstall            remove everything `make install` put in place
#
# Variables (override on the command line, e.g. `make install PREFIX=/usr`):
#   PREFIX=/usr/local   binaries, interface XML
#   DESTDIR=            staging root for packaging; prepended to every path
#
# Where things go, and why not everything follows PREFIX: the files read by
# system daemons must be where those daemons look, whatever PREFIX is.
#   $(PREFIX)/bin/vmctl                        CLI (and vmmanager-notify if built)
#   $(PREFIX)/libexec/vmmanagerd               daemon, started by D-Bus/systemd only
#   $(PREFIX)/share/dbus-1/interfaces/         introspection XML (for developers)
#   /usr/share/dbus-1/system.d/                bus policy: dbus-daemon reads only
#                                              this and /etc/dbus-1/system.d (the
#                                              latter is the admin's)
#   /usr/share/dbus-1/system-services/         bus activation file
#   /usr/share/polkit-1/actions/               polkit reads actions only here
#   $(SYSTEMDUNITDIR) (/lib/systemd/system)    systemd unit; from systemd.pc when
#                                              available (distribution's unit dir)
# Each of these has its own variable (DBUS_POLICYDIR, DBUS_SERVICEDIR,
# POLKIT_ACTIONDIR, SYSTEMDUNITDIR) for distributions that differ.
#
# The bus activation file and the systemd unit name the daemon by absolute
# path. Their sources carry the default /usr/local/libexec/vmmanagerd; install
# writes the real $(LIBEXECDIR) into the installed copies with sed.

PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR    ?= $(PREFIX)/share
DBUS_INTERFACESDIR ?= $(DATADIR)/dbus-1/interfaces

DBUS_POLICYDIR   ?= /usr/share/dbus-1/system.d
DBUS_SERVICEDIR  ?= /usr/share/dbus-1/system-services
POLKIT_ACTIONDIR ?= /usr/share/polkit-1/actions
SYSTEMDUNITDIR   ?= $(shell pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || echo /lib/systemd/system)
# pkg-config may be present but print nothing.
ifeq ($(strip $(SYSTEMDUNITDIR)),)
SYSTEMDUNITDIR = /lib/systemd/system
endif

CARGO      ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
RELEASE    := $(TARGET_DIR)/release

INSTALL      ?= install
INSTALL_PROG := $(INSTALL) -m 0755
INSTALL_DATA := $(INSTALL) -m 0644

# The path baked into the sources (see above).
SOURCE_LIBEXECDIR := /usr/local/libexec

BUS_NAME       := org.example.VmManager
BUS_POLICY_FILE := dbus/$(BUS_NAME).conf
SERVICE_FILE   := dbus/$(BUS_NAME).service
INTERFACE_XML  := dbus/org.example.VmManager1.xml
POLKIT_FILE    := polkit/org.example.vmmanager.policy
UNIT_FILE      := systemd/vmmanagerd.service

.PHONY: all build check check-data install uninstall clean

all: build

build:
	$(CARGO) build --release --locked

# The same tests as scripts/test, without its root check and dependency
# installation (the end-to-end tests need root and the packages of
# scripts/install-deps; `sudo scripts/test` sets both up).
check: check-data
	$(CARGO) test --locked

# Well-formedness of the XML files (and the polkit policy against polkit's
# DTD), and the unit's syntax. Each tool is optional: skipped when missing.
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
	    out=$$(systemd-analyze verify $(UNIT_FILE) 2>&1 | grep -v 'is not executable' || true); \
	    if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; \
	    echo "check-data: $(UNIT_FILE) OK"; \
	fi

# Installs what `make` built; never builds itself, so that `sudo make install`
# does not leave root-owned files in target/.
install:
	@for b in vmctl vmmanagerd; do \
	    if [ ! -x $(RELEASE)/$$b ]; then \
	        echo "$(RELEASE)/$$b is missing: run 'make' first" >&2; exit 1; \
	    fi; \
	done
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBEXECDIR) \
	    $(DESTDIR)$(DBUS_POLICYDIR) $(DESTDIR)$(DBUS_SERVICEDIR) \
	    $(DESTDIR)$(POLKIT_ACTIONDIR) $(DESTDIR)$(SYSTEMDUNITDIR)
	$(INSTALL_PROG) $(RELEASE)/vmctl $(DESTDIR)$(BINDIR)/vmctl
	if [ -x $(RELEASE)/vmmanager-notify ]; then \
	    $(INSTALL_PROG) $(RELEASE)/vmmanager-notify $(DESTDIR)$(BINDIR)/vmmanager-notify; \
	fi
	$(INSTALL_PROG) $(RELEASE)/vmmanagerd $(DESTDIR)$(LIBEXECDIR)/vmmanagerd
	$(INSTALL_DATA) $(BUS_POLICY_FILE) $(DESTDIR)$(DBUS_POLICYDIR)/$(BUS_NAME).conf
	sed -e 's|$(SOURCE_LIBEXECDIR)/|$(LIBEXECDIR)/|g' $(SERVICE_FILE) \
	    > $(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service
	chmod 0644 $(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service
	$(INSTALL_DATA) $(POLKIT_FILE) $(DESTDIR)$(POLKIT_ACTIONDIR)/org.example.vmmanager.policy
	sed -e 's|$(SOURCE_LIBEXECDIR)/|$(LIBEXECDIR)/|g' $(UNIT_FILE) \
	    > $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanagerd.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanagerd.service
	if [ -f $(INTERFACE_XML) ]; then \
	    $(INSTALL) -d $(DESTDIR)$(DBUS_INTERFACESDIR) && \
	    $(INSTALL_DATA) $(INTERFACE_XML) $(DESTDIR)$(DBUS_INTERFACESDIR)/org.example.VmManager1.xml; \
	fi
	@if [ -z "$(DESTDIR)" ]; then \
	    echo "Installed. dbus-daemon and polkitd pick up the new files by themselves;"; \
	    echo "run 'systemctl daemon-reload' so systemd sees vmmanagerd.service."; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vmctl $(DESTDIR)$(BINDIR)/vmmanager-notify
	rm -f $(DESTDIR)$(LIBEXECDIR)/vmmanagerd
	rm -f $(DESTDIR)$(DBUS_POLICYDIR)/$(BUS_NAME).conf
	rm -f $(DESTDIR)$(DBUS_SERVICEDIR)/$(BUS_NAME).service
	rm -f $(DESTDIR)$(POLKIT_ACTIONDIR)/org.example.vmmanager.policy
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/vmmanagerd.service
	rm -f $(DESTDIR)$(DBUS_INTERFACESDIR)/org.example.VmManager1.xml

clean:
	$(CARGO) clean
