"""The CSI Identity service: who the plugin is, what it serves, whether it is ready."""

from __future__ import annotations

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from appliance import __version__
from appliance.csi.backend import Appliance
from appliance.csi.params import DRIVER
from appliance.csi.proto import csi_pb2 as csi
from appliance.csi.proto import csi_pb2_grpc as csi_grpc
from appliance.errors import ApplianceError, FailedPrecondition

Service = csi.PluginCapability.Service
Expansion = csi.PluginCapability.VolumeExpansion


class Identity(csi_grpc.IdentityServicer):
    def __init__(self, appliance: Appliance) -> None:
        self.appliance = appliance

    def GetPluginInfo(self, request: csi.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi.GetPluginInfoResponse:
        return csi.GetPluginInfoResponse(name=DRIVER, vendor_version=__version__)

    def GetPluginCapabilities(self, request: csi.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext
                              ) -> csi.GetPluginCapabilitiesResponse:
        # the same in every mode: the capabilities of the plugin as deployed (the spec)
        return csi.GetPluginCapabilitiesResponse(capabilities=[
            csi.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
            csi.PluginCapability(service=Service(
                type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            csi.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
            csi.PluginCapability(volume_expansion=Expansion(type=Expansion.OFFLINE))])

    def Probe(self, request: csi.ProbeRequest,
              context: grpc.ServicerContext) -> csi.ProbeResponse:
        """Ready when the node daemon answers with this plugin's token."""
        try:
            self.appliance.node()
        except ApplianceError as exc:
            raise FailedPrecondition(f"the node daemon does not answer: {exc.message}") \
                from exc
        return csi.ProbeResponse(ready=BoolValue(value=True))
