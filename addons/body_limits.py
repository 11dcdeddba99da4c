"""Request and reply body size limits, applied to the inflated size while inflating. (Being built: issue 11.)"""

addons = []
