#!/bin/sh
# Container entry point: initialise the store on first start, then run kmsd.
# The KEK file is a mounted secret (/run/secrets/kek); it is never copied.
set -eu
if [ "${1:-}" = "serve" ] && [ ! -e /var/lib/kms/live ]; then
    kmsd init --store /var/lib/kms --kek-file /run/secrets/kek  # the one CMD serves with
fi
exec kmsd "$@"
