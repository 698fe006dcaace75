# Copyright (c) 2020, NVIDIA CORPORATION. All rights reserved.
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions
# are met:
#  * Redistributions of source code must retain the above copyright
#    notice, this list of conditions and the following disclaimer.
#  * Redistributions in binary form must reproduce the above copyright
#    notice, this list of conditions and the following disclaimer in the
#    documentation and/or other materials provided with the distribution.
#  * Neither the name of NVIDIA CORPORATION nor the names of its
#    contributors may be used to endorse or promote products derived
#    from this software without specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
# EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
# IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
# PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
# CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
# EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
# PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
# PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
# OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
# (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
# OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

"""Triton's ``grpc_service.proto`` as a serialized ``FileDescriptorProto`` (vendored).

Taken by ``stages/serve/triton/vendor.py`` from NVIDIA's ``tritonclient-2.73.0`` wheel
(``tritonclient/grpc/service_pb2.py``, protoc 6.33.5), which is built from
triton-inference-server/common's ``protobuf/`` directory under the BSD-3-Clause license above.
Do not edit: re-run the vendor script.
"""

SERIALIZED = (
    b'\n\x12grpc_service.proto\x12\tinference\x1a\x12model_config.proto"\x13\n\x11ServerLiveRequest""\n'
    b'\x12ServerLiveResponse\x12\x0c\n\x04live\x18\x01 \x01(\x08"\x14\n\x12ServerReadyRequest"$\n\x13Se'
    b'rverReadyResponse\x12\r\n\x05ready\x18\x01 \x01(\x08"2\n\x11ModelReadyRequest\x12\x0c\n\x04name'
    b'\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 \x01(\t"#\n\x12ModelReadyResponse\x12\r\n\x05ready'
    b'\x18\x01 \x01(\x08"\x17\n\x15ServerMetadataRequest"K\n\x16ServerMetadataResponse\x12\x0c\n\x04nam'
    b'e\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 \x01(\t\x12\x12\n\nextensions\x18\x03 \x03(\t"5\n'
    b'\x14ModelMetadataRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 \x01(\t"'
    b'\x8d\x02\n\x15ModelMetadataResponse\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n\x08versions\x18'
    b'\x02 \x03(\t\x12\x10\n\x08platform\x18\x03 \x01(\t\x12?\n\x06inputs\x18\x04 \x03(\x0b2/.inference'
    b'.ModelMetadataResponse.TensorMetadata\x12@\n\x07outputs\x18\x05 \x03(\x0b2/.inference.ModelMetada'
    b'taResponse.TensorMetadata\x1a?\n\x0eTensorMetadata\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n'
    b'\x08datatype\x18\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03"\x99\x01\n\x0eInferParameter\x12'
    b'\x14\n\nbool_param\x18\x01 \x01(\x08H\x00\x12\x15\n\x0bint64_param\x18\x02 \x01(\x03H\x00\x12\x16'
    b'\n\x0cstring_param\x18\x03 \x01(\tH\x00\x12\x16\n\x0cdouble_param\x18\x04 \x01(\x01H\x00\x12\x16'
    b'\n\x0cuint64_param\x18\x05 \x01(\x04H\x00B\x12\n\x10parameter_choice"\xd0\x01\n\x13InferTensorCon'
    b'tents\x12\x15\n\rbool_contents\x18\x01 \x03(\x08\x12\x14\n\x0cint_contents\x18\x02 \x03(\x05\x12'
    b'\x16\n\x0eint64_contents\x18\x03 \x03(\x03\x12\x15\n\ruint_contents\x18\x04 \x03(\r\x12\x17\n\x0f'
    b'uint64_contents\x18\x05 \x03(\x04\x12\x15\n\rfp32_contents\x18\x06 \x03(\x02\x12\x15\n\rfp64_cont'
    b'ents\x18\x07 \x03(\x01\x12\x16\n\x0ebytes_contents\x18\x08 \x03(\x0c"\xee\x06\n\x11ModelInferRequ'
    b'est\x12\x12\n\nmodel_name\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01(\t\x12\n\n\x02id'
    b'\x18\x03 \x01(\t\x12@\n\nparameters\x18\x04 \x03(\x0b2,.inference.ModelInferRequest.ParametersEnt'
    b'ry\x12=\n\x06inputs\x18\x05 \x03(\x0b2-.inference.ModelInferRequest.InferInputTensor\x12H\n\x07ou'
    b'tputs\x18\x06 \x03(\x0b27.inference.ModelInferRequest.InferRequestedOutputTensor\x12\x1a\n\x12raw'
    b'_input_contents\x18\x07 \x03(\x0c\x1a\x94\x02\n\x10InferInputTensor\x12\x0c\n\x04name\x18\x01 '
    b'\x01(\t\x12\x10\n\x08datatype\x18\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03\x12Q\n\nparamete'
    b'rs\x18\x04 \x03(\x0b2=.inference.ModelInferRequest.InferInputTensor.ParametersEntry\x120\n\x08con'
    b'tents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContents\x1aL\n\x0fParametersEntry\x12\x0b\n'
    b'\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter:\x028\x01'
    b'\x1a\xd5\x01\n\x1aInferRequestedOutputTensor\x12\x0c\n\x04name\x18\x01 \x01(\t\x12[\n\nparameters'
    b'\x18\x02 \x03(\x0b2G.inference.ModelInferRequest.InferRequestedOutputTensor.ParametersEntry\x1aL'
    b'\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inf'
    b'erence.InferParameter:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n'
    b'\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParameter:\x028\x01"\xd5\x04\n\x12ModelInferRespo'
    b'nse\x12\x12\n\nmodel_name\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01(\t\x12\n\n\x02id'
    b'\x18\x03 \x01(\t\x12A\n\nparameters\x18\x04 \x03(\x0b2-.inference.ModelInferResponse.ParametersEn'
    b'try\x12@\n\x07outputs\x18\x05 \x03(\x0b2/.inference.ModelInferResponse.InferOutputTensor\x12\x1b'
    b'\n\x13raw_output_contents\x18\x06 \x03(\x0c\x1a\x97\x02\n\x11InferOutputTensor\x12\x0c\n\x04name'
    b'\x18\x01 \x01(\t\x12\x10\n\x08datatype\x18\x02 \x01(\t\x12\r\n\x05shape\x18\x03 \x03(\x03\x12S\n'
    b'\nparameters\x18\x04 \x03(\x0b2?.inference.ModelInferResponse.InferOutputTensor.ParametersEntry'
    b'\x120\n\x08contents\x18\x05 \x01(\x0b2\x1e.inference.InferTensorContents\x1aL\n\x0fParametersEntr'
    b'y\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.inference.InferParamete'
    b'r:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 '
    b'\x01(\x0b2\x19.inference.InferParameter:\x028\x01"h\n\x18ModelStreamInferResponse\x12\x15\n\rerro'
    b'r_message\x18\x01 \x01(\t\x125\n\x0einfer_response\x18\x02 \x01(\x0b2\x1d.inference.ModelInferRes'
    b'ponse"3\n\x12ModelConfigRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 '
    b'\x01(\t"=\n\x13ModelConfigResponse\x12&\n\x06config\x18\x01 \x01(\x0b2\x16.inference.ModelConfig"'
    b'7\n\x16ModelStatisticsRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0f\n\x07version\x18\x02 \x01'
    b'(\t".\n\x11StatisticDuration\x12\r\n\x05count\x18\x01 \x01(\x04\x12\n\n\x02ns\x18\x02 \x01(\x04"'
    b'\x9c\x03\n\x0fInferStatistics\x12-\n\x07success\x18\x01 \x01(\x0b2\x1c.inference.StatisticDuratio'
    b'n\x12*\n\x04fail\x18\x02 \x01(\x0b2\x1c.inference.StatisticDuration\x12+\n\x05queue\x18\x03 \x01('
    b'\x0b2\x1c.inference.StatisticDuration\x123\n\rcompute_input\x18\x04 \x01(\x0b2\x1c.inference.Stat'
    b'isticDuration\x123\n\rcompute_infer\x18\x05 \x01(\x0b2\x1c.inference.StatisticDuration\x124\n\x0e'
    b'compute_output\x18\x06 \x01(\x0b2\x1c.inference.StatisticDuration\x12/\n\tcache_hit\x18\x07 \x01('
    b'\x0b2\x1c.inference.StatisticDuration\x120\n\ncache_miss\x18\x08 \x01(\x0b2\x1c.inference.Statist'
    b'icDuration"\xc3\x02\n\x17InferResponseStatistics\x123\n\rcompute_infer\x18\x01 \x01(\x0b2\x1c.inf'
    b'erence.StatisticDuration\x124\n\x0ecompute_output\x18\x02 \x01(\x0b2\x1c.inference.StatisticDurat'
    b'ion\x12-\n\x07success\x18\x03 \x01(\x0b2\x1c.inference.StatisticDuration\x12*\n\x04fail\x18\x04 '
    b'\x01(\x0b2\x1c.inference.StatisticDuration\x124\n\x0eempty_response\x18\x05 \x01(\x0b2\x1c.infere'
    b'nce.StatisticDuration\x12,\n\x06cancel\x18\x06 \x01(\x0b2\x1c.inference.StatisticDuration"\xca'
    b'\x01\n\x14InferBatchStatistics\x12\x12\n\nbatch_size\x18\x01 \x01(\x04\x123\n\rcompute_input\x18'
    b'\x02 \x01(\x0b2\x1c.inference.StatisticDuration\x123\n\rcompute_infer\x18\x03 \x01(\x0b2\x1c.infe'
    b'rence.StatisticDuration\x124\n\x0ecompute_output\x18\x04 \x01(\x0b2\x1c.inference.StatisticDurati'
    b'on":\n\x0bMemoryUsage\x12\x0c\n\x04type\x18\x01 \x01(\t\x12\n\n\x02id\x18\x02 \x01(\x03\x12\x11\n'
    b'\tbyte_size\x18\x03 \x01(\x04"\xb4\x03\n\x0fModelStatistics\x12\x0c\n\x04name\x18\x01 \x01(\t\x12'
    b'\x0f\n\x07version\x18\x02 \x01(\t\x12\x16\n\x0elast_inference\x18\x03 \x01(\x04\x12\x17\n\x0finfe'
    b'rence_count\x18\x04 \x01(\x04\x12\x17\n\x0fexecution_count\x18\x05 \x01(\x04\x123\n\x0finference_'
    b'stats\x18\x06 \x01(\x0b2\x1a.inference.InferStatistics\x124\n\x0bbatch_stats\x18\x07 \x03(\x0b2'
    b'\x1f.inference.InferBatchStatistics\x12,\n\x0cmemory_usage\x18\x08 \x03(\x0b2\x16.inference.Memor'
    b'yUsage\x12E\n\x0eresponse_stats\x18\t \x03(\x0b2-.inference.ModelStatistics.ResponseStatsEntry'
    b'\x1aX\n\x12ResponseStatsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x121\n\x05value\x18\x02 \x01(\x0b2'
    b'".inference.InferResponseStatistics:\x028\x01"J\n\x17ModelStatisticsResponse\x12/\n\x0bmodel_stat'
    b's\x18\x01 \x03(\x0b2\x1a.inference.ModelStatistics"\x8a\x01\n\x18ModelRepositoryParameter\x12\x14'
    b'\n\nbool_param\x18\x01 \x01(\x08H\x00\x12\x15\n\x0bint64_param\x18\x02 \x01(\x03H\x00\x12\x16\n'
    b'\x0cstring_param\x18\x03 \x01(\tH\x00\x12\x15\n\x0bbytes_param\x18\x04 \x01(\x0cH\x00B\x12\n\x10p'
    b'arameter_choice"@\n\x16RepositoryIndexRequest\x12\x17\n\x0frepository_name\x18\x01 \x01(\t\x12\r'
    b'\n\x05ready\x18\x02 \x01(\x08"\xa4\x01\n\x17RepositoryIndexResponse\x12=\n\x06models\x18\x01 \x03'
    b'(\x0b2-.inference.RepositoryIndexResponse.ModelIndex\x1aJ\n\nModelIndex\x12\x0c\n\x04name\x18\x01'
    b' \x01(\t\x12\x0f\n\x07version\x18\x02 \x01(\t\x12\r\n\x05state\x18\x03 \x01(\t\x12\x0e\n\x06reaso'
    b'n\x18\x04 \x01(\t"\xec\x01\n\x1aRepositoryModelLoadRequest\x12\x17\n\x0frepository_name\x18\x01 '
    b'\x01(\t\x12\x12\n\nmodel_name\x18\x02 \x01(\t\x12I\n\nparameters\x18\x03 \x03(\x0b25.inference.Re'
    b'positoryModelLoadRequest.ParametersEntry\x1aV\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01('
    b'\t\x122\n\x05value\x18\x02 \x01(\x0b2#.inference.ModelRepositoryParameter:\x028\x01"\x1d\n\x1bRep'
    b'ositoryModelLoadResponse"\xf0\x01\n\x1cRepositoryModelUnloadRequest\x12\x17\n\x0frepository_name'
    b'\x18\x01 \x01(\t\x12\x12\n\nmodel_name\x18\x02 \x01(\t\x12K\n\nparameters\x18\x03 \x03(\x0b27.inf'
    b'erence.RepositoryModelUnloadRequest.ParametersEntry\x1aV\n\x0fParametersEntry\x12\x0b\n\x03key'
    b'\x18\x01 \x01(\t\x122\n\x05value\x18\x02 \x01(\x0b2#.inference.ModelRepositoryParameter:\x028\x01'
    b'"\x1f\n\x1dRepositoryModelUnloadResponse"/\n\x1fSystemSharedMemoryStatusRequest\x12\x0c\n\x04name'
    b'\x18\x01 \x01(\t"\xa5\x02\n SystemSharedMemoryStatusResponse\x12I\n\x07regions\x18\x01 \x03(\x0b2'
    b'8.inference.SystemSharedMemoryStatusResponse.RegionsEntry\x1aL\n\x0cRegionStatus\x12\x0c\n\x04nam'
    b'e\x18\x01 \x01(\t\x12\x0b\n\x03key\x18\x02 \x01(\t\x12\x0e\n\x06offset\x18\x03 \x01(\x04\x12\x11'
    b'\n\tbyte_size\x18\x04 \x01(\x04\x1ah\n\x0cRegionsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12G\n'
    b'\x05value\x18\x02 \x01(\x0b28.inference.SystemSharedMemoryStatusResponse.RegionStatus:\x028\x01"a'
    b'\n!SystemSharedMemoryRegisterRequest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0b\n\x03key\x18\x02 '
    b'\x01(\t\x12\x0e\n\x06offset\x18\x03 \x01(\x04\x12\x11\n\tbyte_size\x18\x04 \x01(\x04"$\n"SystemSh'
    b'aredMemoryRegisterResponse"3\n#SystemSharedMemoryUnregisterRequest\x12\x0c\n\x04name\x18\x01 \x01'
    b'(\t"&\n$SystemSharedMemoryUnregisterResponse"-\n\x1dCudaSharedMemoryStatusRequest\x12\x0c\n\x04na'
    b'me\x18\x01 \x01(\t"\x95\x02\n\x1eCudaSharedMemoryStatusResponse\x12G\n\x07regions\x18\x01 \x03('
    b'\x0b26.inference.CudaSharedMemoryStatusResponse.RegionsEntry\x1aB\n\x0cRegionStatus\x12\x0c\n\x04'
    b'name\x18\x01 \x01(\t\x12\x11\n\tdevice_id\x18\x02 \x01(\x04\x12\x11\n\tbyte_size\x18\x03 \x01('
    b'\x04\x1af\n\x0cRegionsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12E\n\x05value\x18\x02 \x01(\x0b26.'
    b'inference.CudaSharedMemoryStatusResponse.RegionStatus:\x028\x01"i\n\x1fCudaSharedMemoryRegisterRe'
    b'quest\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x12\n\nraw_handle\x18\x02 \x01(\x0c\x12\x11\n\tdevice'
    b'_id\x18\x03 \x01(\x03\x12\x11\n\tbyte_size\x18\x04 \x01(\x04""\n CudaSharedMemoryRegisterResponse'
    b'"1\n!CudaSharedMemoryUnregisterRequest\x12\x0c\n\x04name\x18\x01 \x01(\t"$\n"CudaSharedMemoryUnre'
    b'gisterResponse"\xe6\x01\n\x13TraceSettingRequest\x12>\n\x08settings\x18\x01 \x03(\x0b2,.inference'
    b'.TraceSettingRequest.SettingsEntry\x12\x12\n\nmodel_name\x18\x02 \x01(\t\x1a\x1d\n\x0cSettingValu'
    b'e\x12\r\n\x05value\x18\x01 \x03(\t\x1a\\\n\rSettingsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12:\n'
    b'\x05value\x18\x02 \x01(\x0b2+.inference.TraceSettingRequest.SettingValue:\x028\x01"\xd5\x01\n\x14'
    b'TraceSettingResponse\x12?\n\x08settings\x18\x01 \x03(\x0b2-.inference.TraceSettingResponse.Settin'
    b'gsEntry\x1a\x1d\n\x0cSettingValue\x12\r\n\x05value\x18\x01 \x03(\t\x1a]\n\rSettingsEntry\x12\x0b'
    b'\n\x03key\x18\x01 \x01(\t\x12;\n\x05value\x18\x02 \x01(\x0b2,.inference.TraceSettingResponse.Sett'
    b'ingValue:\x028\x01"\x9a\x02\n\x12LogSettingsRequest\x12=\n\x08settings\x18\x01 \x03(\x0b2+.infere'
    b'nce.LogSettingsRequest.SettingsEntry\x1ah\n\x0cSettingValue\x12\x14\n\nbool_param\x18\x01 \x01('
    b'\x08H\x00\x12\x16\n\x0cuint32_param\x18\x02 \x01(\rH\x00\x12\x16\n\x0cstring_param\x18\x03 \x01('
    b'\tH\x00B\x12\n\x10parameter_choice\x1a[\n\rSettingsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x129\n'
    b'\x05value\x18\x02 \x01(\x0b2*.inference.LogSettingsRequest.SettingValue:\x028\x01"\x9d\x02\n\x13L'
    b'ogSettingsResponse\x12>\n\x08settings\x18\x01 \x03(\x0b2,.inference.LogSettingsResponse.SettingsE'
    b'ntry\x1ah\n\x0cSettingValue\x12\x14\n\nbool_param\x18\x01 \x01(\x08H\x00\x12\x16\n\x0cuint32_para'
    b'm\x18\x02 \x01(\rH\x00\x12\x16\n\x0cstring_param\x18\x03 \x01(\tH\x00B\x12\n\x10parameter_choice'
    b'\x1a\\\n\rSettingsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12:\n\x05value\x18\x02 \x01(\x0b2+.infe'
    b'rence.LogSettingsResponse.SettingValue:\x028\x012\xb7\x0f\n\x14GRPCInferenceService\x12K\n\nServe'
    b'rLive\x12\x1c.inference.ServerLiveRequest\x1a\x1d.inference.ServerLiveResponse"\x00\x12N\n\x0bSer'
    b'verReady\x12\x1d.inference.ServerReadyRequest\x1a\x1e.inference.ServerReadyResponse"\x00\x12K\n\n'
    b'ModelReady\x12\x1c.inference.ModelReadyRequest\x1a\x1d.inference.ModelReadyResponse"\x00\x12W\n'
    b'\x0eServerMetadata\x12 .inference.ServerMetadataRequest\x1a!.inference.ServerMetadataResponse"'
    b'\x00\x12T\n\rModelMetadata\x12\x1f.inference.ModelMetadataRequest\x1a .inference.ModelMetadataRes'
    b'ponse"\x00\x12K\n\nModelInfer\x12\x1c.inference.ModelInferRequest\x1a\x1d.inference.ModelInferRes'
    b'ponse"\x00\x12[\n\x10ModelStreamInfer\x12\x1c.inference.ModelInferRequest\x1a#.inference.ModelStr'
    b'eamInferResponse"\x00(\x010\x01\x12N\n\x0bModelConfig\x12\x1d.inference.ModelConfigRequest\x1a'
    b'\x1e.inference.ModelConfigResponse"\x00\x12Z\n\x0fModelStatistics\x12!.inference.ModelStatisticsR'
    b'equest\x1a".inference.ModelStatisticsResponse"\x00\x12Z\n\x0fRepositoryIndex\x12!.inference.Repos'
    b'itoryIndexRequest\x1a".inference.RepositoryIndexResponse"\x00\x12f\n\x13RepositoryModelLoad\x12%.'
    b'inference.RepositoryModelLoadRequest\x1a&.inference.RepositoryModelLoadResponse"\x00\x12l\n\x15Re'
    b"positoryModelUnload\x12'.inference.RepositoryModelUnloadRequest\x1a(.inference.RepositoryModelUnl"
    b'oadResponse"\x00\x12u\n\x18SystemSharedMemoryStatus\x12*.inference.SystemSharedMemoryStatusReques'
    b't\x1a+.inference.SystemSharedMemoryStatusResponse"\x00\x12{\n\x1aSystemSharedMemoryRegister\x12,.'
    b'inference.SystemSharedMemoryRegisterRequest\x1a-.inference.SystemSharedMemoryRegisterResponse"'
    b'\x00\x12\x81\x01\n\x1cSystemSharedMemoryUnregister\x12..inference.SystemSharedMemoryUnregisterReq'
    b'uest\x1a/.inference.SystemSharedMemoryUnregisterResponse"\x00\x12o\n\x16CudaSharedMemoryStatus'
    b'\x12(.inference.CudaSharedMemoryStatusRequest\x1a).inference.CudaSharedMemoryStatusResponse"\x00'
    b'\x12u\n\x18CudaSharedMemoryRegister\x12*.inference.CudaSharedMemoryRegisterRequest\x1a+.inference'
    b'.CudaSharedMemoryRegisterResponse"\x00\x12{\n\x1aCudaSharedMemoryUnregister\x12,.inference.CudaSh'
    b'aredMemoryUnregisterRequest\x1a-.inference.CudaSharedMemoryUnregisterResponse"\x00\x12Q\n\x0cTrac'
    b'eSetting\x12\x1e.inference.TraceSettingRequest\x1a\x1f.inference.TraceSettingResponse"\x00\x12N\n'
    b'\x0bLogSettings\x12\x1d.inference.LogSettingsRequest\x1a\x1e.inference.LogSettingsResponse"\x00b'
    b'\x06proto3'
)
