"""The last request guard: no authenticated identity, or an approval required and not granted → refused."""

addons = []
